"""``clbench sweep``: a methods × benchmarks × task counts × seeds grid, one submitit job per cell.

Scheduling is submitit's (SLURM job arrays, or local processes); clbench only expands the grid,
validates it, and hands each cell to :func:`clbench.runner.run` as a one-method, one-seed plan.
Every job writes into the same sweep folder — the runner's layout
``<sweep>/<bench>-<n>tasks/<method>/seed-<k>/`` keeps them apart — so ``clbench report <sweep>``
gives the whole table. Jobs do not write ``run.json`` (they would overwrite each other's); the
sweep records its grid and settings in ``<sweep>/sweep.json`` and submitit's pickles and logs go to
``<sweep>/submitit/``.

Re-running the same sweep (same ``--out/--name``) submits only the cells whose ``results.json`` is
not complete; an interrupted cell resumes from its ``checkpoint.pt`` (the runner does that when
given the same folder). Settings that change results (epochs, ``--set``, backbone...) must match
the ones in ``sweep.json``, or the sweep refuses to mix them in one folder.

The local launcher runs at most ``--max-parallel`` jobs at a time (default: one per
``--gpus-per-run`` visible GPUs, else one per ``--cpus-per-run`` cores), each pinned to its own
GPUs: submitit's ``LocalExecutor`` starts every submitted job at once, so clbench keeps the queue.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clbench.errors import UsageError
from clbench.schema import RunResult
from clbench.results import read_json, write_json

POLL_SECONDS = 1.0


@dataclass
class Cell:
    """One grid cell = one submitit job."""

    method: str
    benchmark: str
    n_tasks: int
    seed: int
    out_dir: Path
    plan: object      # RunPlan restricted to this method and seed (and the --set items it uses)
    settings: dict    # the grid's settings that change numbers (recorded in sweep.json)

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.json"

    def complete(self) -> bool:
        return self.results_path.exists() and RunResult.read(self.results_path).complete

    @property
    def key(self) -> str:
        return f"{self.benchmark}-{self.n_tasks}tasks/{self.method}/seed-{self.seed}"

    def label(self) -> str:
        return f"{self.method} {self.benchmark} {self.n_tasks}tasks seed {self.seed}"


def run_cell(plan, threads: int | None = None) -> str:
    """The submitit job: run one (method, benchmark, tasks, seed) plan; returns its results path."""
    import torch

    from clbench.distributed import all_cores
    from clbench.runner import run

    if threads:  # the job's share of the cores (SLURM --cpus-per-task, or the local slot)
        torch.set_num_threads(max(1, min(threads, all_cores())))
    return str(run(plan, record_plan=False)[0])


def expand_grid(args, sweep_dir: Path) -> list[Cell]:
    """Every cell of the grid: ``run``'s plan builder and ``prepare`` for each benchmark × task
    count (names, task counts, ``--set`` keys, structural requirements), before anything is
    submitted; each cell's plan is that plan restricted to one method and seed."""
    from clbench.hparams import matches, parse_override
    from clbench.plan import plan_from_args, prepare

    if args.methods is None:
        raise UsageError("--methods: give comma-separated method names or 'all'")
    cells = []
    for bench in args.benchmarks:
        for n_tasks in (args.task_counts or [None]):
            plan = plan_from_args(args, run_dir=str(sweep_dir), benchmark=bench, n_tasks=n_tasks)
            prepared = prepare(plan, record_plan=False)
            data = prepared.benchmark
            for job in prepared.jobs:  # unresolved device and precision: the job's node decides
                scopes = [(job.method, job.config), (data.name, data.config)]
                overrides = [o for o in plan.overrides if matches(parse_override(o), scopes)]
                cell_plan = dataclasses.replace(plan, n_tasks=prepared.n_tasks, methods=[job.method],
                                                seeds=[job.seed], overrides=overrides)
                cells.append(Cell(job.method, data.name, prepared.n_tasks, job.seed, job.out_dir,
                                  cell_plan, plan.settings(grid=False)))
    return cells


def record_sweep(sweep_dir: Path, args, cells: list[Cell], submitted: dict[str, str] = None) -> dict:
    """Write ``sweep.json`` (settings, grid, the submitit job id of each cell); refuse a re-run
    whose settings differ. Returns the jobs recorded before this call, by cell key."""
    path = sweep_dir / "sweep.json"
    settings = cells[0].settings
    listed = {}
    if path.exists():
        previous = read_json(path)
        changed = [k for k in settings if previous["settings"].get(k) != settings[k]]
        if changed:
            detail = ", ".join(f"{k}: {previous['settings'].get(k)!r} → {settings[k]!r}" for k in changed)
            raise UsageError(f"{sweep_dir} holds a sweep with other settings ({detail}); "
                             "use another --name, or the same settings to resume it")
        listed = {j["key"]: j for j in previous["jobs"]}
    before = {k: dict(v) for k, v in listed.items()}
    for c in cells:
        entry = listed.setdefault(c.key, {"key": c.key, "method": c.method, "benchmark": c.benchmark,
                                          "n_tasks": c.n_tasks, "seed": c.seed})
        if submitted and c.key in submitted:
            entry.update(job_id=submitted[c.key], launcher=args.launcher)
    write_json(path, {"settings": settings, "jobs": list(listed.values())})
    return before


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"submitit" in cmdline


def still_running(job, launcher: str) -> bool:
    """Local jobs from an earlier invocation have no process handle: look the pid up instead."""
    if launcher == "local" and getattr(job, "_process", None) is None:
        return _pid_alive(int(job.job_id))
    return not job.done()


# sacct states of a job that may still write its folder; UNKNOWN (e.g. purged from accounting)
# counts as gone, so an old sweep is resubmitted rather than waited for forever.
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING",
                "SUSPENDED", "PREEMPTED", "READY"}


def earlier_job(folder: Path, entry: dict | None, launcher: str):
    """The job a previous invocation submitted for this cell, if it is still queued or running
    (re-running a sweep must not start a second copy writing the same folder)."""
    if not entry or "job_id" not in entry or entry.get("launcher") != launcher:
        return None
    if launcher == "local":
        from submitit.local.local import LocalJob

        job = LocalJob(folder=folder, job_id=entry["job_id"])
        return job if _pid_alive(int(job.job_id)) else None
    from submitit.slurm.slurm import SlurmJob

    job = SlurmJob(folder=folder, job_id=entry["job_id"])
    state = job.get_info(mode="force").get("State") or "UNKNOWN"
    return job if state.split()[0].upper() in SLURM_ACTIVE else None


# ------------------------------------------------------------------------------ executors
def slurm_executor(folder: Path, args, n_jobs: int):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        name="clbench", timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_run,
        cpus_per_task=args.cpus_per_run, mem_gb=args.mem_gb, tasks_per_node=1, nodes=1,
        slurm_partition=args.slurm_partition,
        slurm_array_parallelism=args.max_parallel or n_jobs)
    return executor


def local_slots(args) -> list[tuple[int, ...]]:
    """GPU ids of each concurrent local job (empty tuples on CPU)."""
    import torch

    from clbench.distributed import all_cores

    n_gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    if n_gpus and args.gpus_per_run > 0:
        if args.gpus_per_run > n_gpus:
            raise UsageError(f"--gpus-per-run {args.gpus_per_run}: only {n_gpus} GPUs are visible")
        g = args.gpus_per_run
        slots = [tuple(range(k * g, (k + 1) * g)) for k in range(n_gpus // g)]
    else:
        if args.device == "cuda":
            raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        slots = [()] * max(1, all_cores() // max(1, args.cpus_per_run))
    if args.max_parallel:
        slots = [slots[k % len(slots)] for k in range(args.max_parallel)]
    return slots


def submit_local(folder: Path, args, cells: list[Cell], log, on_submit) -> dict[int, object]:
    """Keep at most one job per slot running (submitit's LocalExecutor would start them all at
    once); returns {cell index: job} when every job has been started (and, unless --no-wait,
    has ended)."""
    import submitit

    slots = local_slots(args)
    if args.no_wait and len(cells) > len(slots):
        raise UsageError(f"--no-wait with the local launcher starts every job at once, but only "
                         f"{len(slots)} may run at a time here; drop --no-wait, raise "
                         "--max-parallel, or use --launcher slurm")
    executor = submitit.LocalExecutor(folder=folder)
    jobs: dict[int, object] = {}
    running: dict[int, object] = {}  # slot -> job
    queue = list(range(len(cells)))
    try:
        while queue or running:
            running = {slot: job for slot, job in running.items() if not job.done()}
            for slot, gpus in enumerate(slots):
                if queue and slot not in running:
                    index = queue.pop(0)
                    executor.update_parameters(timeout_min=args.timeout_min,
                                               gpus_per_node=len(gpus), visible_gpus=gpus)
                    job = executor.submit(run_cell, cells[index].plan, args.cpus_per_run)
                    jobs[index] = running[slot] = job
                    on_submit(cells[index], job)
                    gpu_note = f", GPUs {','.join(map(str, gpus))}" if gpus else ""
                    log(f"started {cells[index].label()} (local job {job.job_id}{gpu_note})")
            if args.no_wait:
                break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel()
        raise
    return jobs


def submit_slurm(folder: Path, args, cells: list[Cell], log, on_submit) -> dict[int, object]:
    """One SLURM job array for the whole grid (``--max-parallel`` = the array's ``%`` limit)."""
    executor = slurm_executor(folder, args, len(cells))
    jobs = executor.map_array(run_cell, [c.plan for c in cells], [args.cpus_per_run] * len(cells))
    for cell, job in zip(cells, jobs):
        on_submit(cell, job)
        log(f"submitted {cell.label()} (SLURM job {job.job_id})")
    return dict(enumerate(jobs))


def wait_for(jobs: dict[int, object], launcher: str) -> None:
    poll = POLL_SECONDS if launcher == "local" else 30.0
    while any(still_running(job, launcher) for job in jobs.values()):
        time.sleep(poll)


# ------------------------------------------------------------------------------ status
def job_state(cell: Cell, job, launcher: str) -> str:
    from submitit.core.utils import pickle_load

    if job is None:
        return "skipped (already complete)"
    if cell.complete():
        return "done"
    if still_running(job, launcher):
        return "running"
    if not job.paths.result_pickle.exists():
        return "ended without a result (killed or timed out?)"
    outcome, value = pickle_load(job.paths.result_pickle)
    if outcome == "error":
        lines = [line for line in str(value).strip().splitlines() if line.strip()]
        return f"failed: {lines[-1][:100] if lines else 'see log'}"
    return "ended incomplete"


def print_status(cells: list[Cell], jobs: dict, launcher: str, stream=None) -> int:
    """Per-job table; returns how many jobs are not complete. ``stream``: ``sys.stdout`` as it is
    at the call (a default bound at import would keep writing to a replaced stdout)."""
    stream = stream or sys.stdout
    rows = [("method", "benchmark", "tasks", "seed", "state", "results (or log)")]
    unfinished = 0
    for index, cell in enumerate(cells):
        job = jobs.get(index)
        state = job_state(cell, job, launcher)
        ok = cell.complete()
        unfinished += not ok
        rows.append((cell.method, cell.benchmark, str(cell.n_tasks), str(cell.seed), state,
                     str(cell.results_path if ok or job is None else job.paths.stderr)))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=stream)
    return unfinished


def run_sweep(args) -> int:
    from clbench.plan import run_folder

    sweep_dir = Path(run_folder(args.out, args.name, "sweep"))
    name = sweep_dir.name
    if args.launcher == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--launcher slurm: no `sbatch` on this machine; run on a SLURM login node "
                         "or use --launcher local")
    cells = expand_grid(args, sweep_dir)
    if not cells:
        raise UsageError("the grid is empty")
    earlier = record_sweep(sweep_dir, args, cells)
    folder = sweep_dir / "submitit"
    jobs: dict[int, object] = {}  # cell index -> job (absent: already complete)
    todo = []
    for k, cell in enumerate(cells):
        if cell.complete():
            continue
        job = earlier_job(folder, earlier.get(cell.key), args.launcher)
        if job is not None:
            jobs[k] = job
        else:
            todo.append(k)
    print(f"sweep {sweep_dir}: {len(cells)} jobs — {len(cells) - len(todo) - len(jobs)} already "
          f"complete, {len(jobs)} still running from an earlier call, {len(todo)} to submit "
          f"({args.launcher})")

    def on_submit(cell, job):
        record_sweep(sweep_dir, args, cells, {cell.key: str(job.job_id)})

    try:
        if todo:
            submit = submit_slurm if args.launcher == "slurm" else submit_local
            started = submit(folder, args, [cells[k] for k in todo], print, on_submit)
            jobs.update({todo[k]: job for k, job in started.items()})
        if args.no_wait:
            print(f"{len(jobs)} jobs queued or running; logs in {folder}. Re-run the same command "
                  f"to wait for them (or resume failed ones), then `clbench report {sweep_dir}`.")
            return 0
        wait_for(jobs, args.launcher)
    except KeyboardInterrupt:
        print("\ninterrupted: finished tasks are saved; re-run the same command to resume"
              + (" (SLURM jobs keep running)" if args.launcher == "slurm" else ""), file=sys.stderr)
        return 130
    unfinished = print_status(cells, jobs, args.launcher)
    from clbench.report import write_report

    try:
        report = write_report([sweep_dir], out_dir=sweep_dir / "report", name=name)
        print(f"report: {report / 'summary.md'}")
    except UsageError as exc:
        print(f"no report: {exc}", file=sys.stderr)
    if unfinished:
        print(f"{unfinished} job(s) did not finish: see their logs; re-run the same command to "
              "resume them", file=sys.stderr)
        return 1
    return 0
