"""``clbench sweep``: a real local grid through submitit, resume of a killed job, the SLURM
submission script, and validation before anything is submitted."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
import torch

from clbench.results import read_json, write_json


def _log_interval(log: Path) -> tuple[datetime, datetime]:
    stamps = re.findall(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\)", log.read_text())
    parse = lambda s: datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    return parse(stamps[0]), parse(stamps[-1])


def _max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _truncate_to_first_task(job_dir: Path) -> None:
    """Turn a finished linear-probe job into the state a kill after task 1 leaves: results with
    one row, checkpoint of task 1 (a linear probe never changes old head rows: the loss sees only
    the current task's logits and SGD momentum restarts each task, so rows 0..4 are task 1's)."""
    results = read_json(job_dir / "results.json")
    for key in ("correct", "total", "trainable_params", "seconds_per_task", "method_info"):
        results[key] = results[key][:1]
    results["complete"], results["status"] = False, "running"
    write_json(job_dir / "results.json", results)
    ckpt = torch.load(job_dir / "checkpoint.pt", weights_only=True)
    first = results["classes_per_task"][0]
    ckpt["model"] = {k: v[:first] if k.startswith("head.fc.") else v for k, v in ckpt["model"].items()}
    ckpt["state"].update(task=0, known_classes=0, n_classes=first)
    torch.save(ckpt, job_dir / "checkpoint.pt")


@pytest.mark.slow  # 4 training jobs in worker processes (~35 s on 2 cores)
def test_local_grid_runs_then_resumes_only_the_killed_job(tmp_path, monkeypatch, tiny_checkpoint, cli):
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--methods", "linear-probe,finetune", "--tasks", "2", "--seeds", "1993,1994",
            "--epochs", "1", "--checkpoint", tiny_checkpoint, "--out", "runs", "--name", "grid",
            "--cpus-per-run", "1", "--max-parallel", "2", "--device", "cpu"]
    code, out, err = cli(*argv)
    assert code == 0, out + err
    sweep = tmp_path / "runs" / "grid"
    job_dirs = {(m, s): sweep / "digits-2tasks" / m / f"seed-{s}"
                for m in ("linear-probe", "finetune") for s in (1993, 1994)}
    for job_dir in job_dirs.values():
        results = read_json(job_dir / "results.json")
        assert results["status"] == "complete" and len(results["correct"]) == 2
    assert not (sweep / "run.json").exists()  # jobs share the folder: only sweep.json describes it
    assert {(j["method"], j["seed"]) for j in read_json(sweep / "sweep.json")["jobs"]} == set(job_dirs)
    assert len(re.findall(r"  done  ", out)) == 4
    report = re.search(r"report: (\S+)", out).group(1)
    summary = (tmp_path / report).read_text()
    assert "linear-probe" in summary and "finetune" in summary
    # submitit's LocalExecutor starts every job at once: the sweep keeps at most 2 running.
    logs = sorted((sweep / "submitit").glob("*_0_log.out"))
    assert len(logs) == 4 and _max_overlap([_log_interval(p) for p in logs]) <= 2

    killed = job_dirs[("linear-probe", 1994)]
    uninterrupted = read_json(killed / "results.json")
    _truncate_to_first_task(killed)
    others = {k: d / "results.json" for k, d in job_dirs.items() if d != killed}
    stamps = {k: p.stat().st_mtime_ns for k, p in others.items()}

    code, out, err = cli(*argv)
    assert code == 0, out + err
    assert "3 already complete" in out and "1 to submit" in out
    assert len(list((sweep / "submitit").glob("*_submitted.pkl"))) == 5  # one new job
    assert {k: p.stat().st_mtime_ns for k, p in others.items()} == stamps
    new_log = max((sweep / "submitit").glob("*_0_log.out"), key=lambda p: p.stat().st_mtime)
    assert "resuming after task 1/2" in new_log.read_text()
    resumed = read_json(killed / "results.json")
    assert resumed["complete"] and resumed["correct"] == uninterrupted["correct"]


@pytest.fixture
def fake_slurm(monkeypatch, tmp_path):
    """SLURM without a scheduler: submitit sees `srun`, `sbatch` returns job ids in turn, and
    `sacct` reports the states in ``states`` (job id -> state)."""
    import os
    import subprocess

    bin_dir = tmp_path / "fake-slurm-bin"  # clbench looks for sbatch on PATH before submitting
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    from submitit.core import utils
    from submitit.slurm import slurm

    calls, ids, states = [], iter(["4242", "4343", "4444"]), {}
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    def sbatch(self, *args, **kwargs):
        calls.append(list(self.command))
        return f"Submitted batch job {next(ids)}\n"

    real_check_output = subprocess.check_output

    def sacct(command, *args, **kwargs):
        if command[0] != "sacct":
            return real_check_output(command, *args, **kwargs)
        rows = "".join(f"{job}|{state}|node1\n" for job, state in states.items())
        return f"JobID|State|NodeList\n{rows}".encode()

    monkeypatch.setattr(utils.CommandFunction, "__call__", sbatch)
    monkeypatch.setattr(subprocess, "check_output", sacct)
    return calls, states


def test_slurm_array_script_requests_the_resources(tmp_path, tiny_checkpoint, cli, fake_slurm):
    from submitit.core.utils import DelayedSubmission

    sbatch_calls, sacct_states = fake_slurm
    argv = ["sweep", "--launcher", "slurm", "--methods", "linear-probe,finetune", "--tasks", "2,5",
            "--seeds", "1,2", "--slurm-partition", "gpu-a100", "--gpus-per-run", "2",
            "--cpus-per-run", "6", "--mem-gb", "48", "--timeout-min", "90", "--max-parallel", "3",
            "--checkpoint", tiny_checkpoint, "--out", tmp_path, "--name", "grid", "--no-wait"]
    code, out, err = cli(*argv)
    assert code == 0, out + err
    assert len(sbatch_calls) == 1 and sbatch_calls[0][0] == "sbatch"  # one job array
    script = Path(sbatch_calls[0][1]).read_text()  # the file submitit hands to sbatch
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=48GB", "#SBATCH --time=90",
                 "#SBATCH --array=0-7%3", "#SBATCH --nodes=1"):
        assert line in script.splitlines(), line
    assert "srun" in script and "submitit.core._submit" in script

    sweep = tmp_path / "grid"
    pickles = sorted((sweep / "submitit").glob("4242_*_submitted.pkl"))
    grid = set()
    for path in pickles:
        plan = DelayedSubmission.load(path).args[0]
        assert Path(plan.run_dir) == sweep.resolve() and plan.epochs is None
        (method,), (seed,) = plan.methods, plan.seeds
        grid.add((method, plan.n_tasks, seed))
    assert grid == {(m, t, s) for m in ("linear-probe", "finetune") for t in (2, 5) for s in (1, 2)}
    recorded = read_json(sweep / "sweep.json")["jobs"]
    assert sorted(j["job_id"] for j in recorded) == [f"4242_{k}" for k in range(8)]

    # Re-run while the array is queued: nothing is submitted twice; a failed element is resubmitted.
    sacct_states.update({f"4242_{k}": "PENDING" for k in range(8)})
    sacct_states["4242_5"] = "FAILED"
    code, out, err = cli(*argv)
    assert code == 0, out + err
    assert "7 still running from an earlier call, 1 to submit" in out
    assert len(sbatch_calls) == 2
    assert sorted(j["job_id"] for j in read_json(sweep / "sweep.json")["jobs"])[-1] == "4343"

    # Other settings in the same folder would mix incomparable runs: refused.
    code, out, err = cli(*argv, "--epochs", "3")
    assert code == 2 and "other settings" in err and "epochs" in err
    assert len(sbatch_calls) == 2


@pytest.mark.parametrize("extra, message", [
    (["--methods", "linear-probe,nope"], "unknown method 'nope'"),
    (["--methods", "linear-probe", "--tasks", "2,3"], "--tasks 3"),
    (["--methods", "linear-probe", "--bench", "digits,nobench"], "unknown benchmark 'nobench'"),
    (["--methods", "linear-probe", "--set", "linear-probe.nokey=1"], "nokey"),
    (["--methods", "linear-probe", "--backbone", "vit-nonsense"], "unknown backbone"),
    (["--methods", "linear-probe", "--checkpoint", "missing.safetensors"], "not found"),
])
def test_bad_grid_is_one_line_and_submits_nothing(tmp_path, cli, extra, message):
    code, out, err = cli("sweep", *extra, "--out", tmp_path, "--name", "bad")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
