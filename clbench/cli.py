"""``clbench run | report | list | perf``. Heavy packages (torch, Avalanche, wandb) are imported
only inside the commands that need them, so ``--help`` and ``list`` answer at once."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clbench.errors import UsageError

WANDB_MODES = ("disabled", "offline", "online")


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values
    return parse


# `run` flags that define what is computed: with --resume the stored plan decides them.
PLAN_FLAGS = ("methods", "bench", "tasks", "seeds", "backbone", "checkpoint", "epochs", "batch_size",
              "lr", "data_dir", "overrides", "plugins", "name", "precision", "out", "download")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clbench", description="Continual-learning benchmark harness for pretrained ViTs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    listing = sub.add_parser("list", help="list methods, benchmarks and backbones")
    listing.add_argument("--plugin", dest="plugins", action="append", default=[],
                         metavar="FILE", help="also list what a plugin file registers")

    run = sub.add_parser("run", help="train methods class-incrementally and write results + report")
    run.add_argument("--methods", type=str, default=None,
                     help="comma-separated method names, or 'all' (default: every built-in method)")
    run.add_argument("--bench", default="digits", help="benchmark name (default: digits, embedded)")
    run.add_argument("--tasks", type=int, default=None, help="number of tasks (benchmark default)")
    run.add_argument("--seeds", type=_csv(int), default=None, help="e.g. 1993,1994 (benchmark default)")
    run.add_argument("--backbone", default=None, help="backbone short name or timm name")
    run.add_argument("--checkpoint", default=None, help="local .safetensors/.pth weights for the backbone")
    run.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    run.add_argument("--batch-size", type=int, default=None, help="override every method's batch size")
    run.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    run.add_argument("--data-dir", default=None, help="data root (else $CLBENCH_DATA, else ~/.cache/clbench)")
    run.add_argument("--download", action="store_true", help="download missing data (verified)")
    run.add_argument("--out", default="runs", help="output folder (default: runs)")
    run.add_argument("--name", default=None, help="run name (default: <bench>-<timestamp>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="hyperparameter override, e.g. --set sdlora.rank=8 or --set split=coda")
    run.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE_OR_MODULE",
                     help="python file or module that registers methods/benchmarks")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--workers", type=int, default=None,
                     help="data-loader worker processes (default: all cores for image benchmarks "
                          "on a GPU, else 0; changes no number: augmentation is seeded per sample)")
    run.add_argument("--wandb", choices=WANDB_MODES, default="disabled")
    run.add_argument("--precision", choices=("bf16", "tf32", "fp32"), default=None,
                     help="bf16 autocast (default on CUDA), tf32, or fp32 (default on CPU)")
    run.add_argument("--decoded-cache", action="store_true",
                     help="decode each image file once into <data>/.decoded/ (disk: w×h×3 bytes "
                          "per image) and read pixels from there; the samples stay identical")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("--ddp", action="store_true",
                     help="data-parallel over --nproc processes via torchrun (gloo on CPU, nccl on GPU)")
    run.add_argument("--nproc", type=int, default=None,
                     help="processes for --ddp (default: number of GPUs, else 2)")

    sweep = sub.add_parser("sweep", help="run a methods × benchmarks × tasks × seeds grid with submitit")
    sweep.add_argument("--methods", required=True, help="comma-separated method names, or 'all'")
    sweep.add_argument("--bench", type=_csv(str), default=["digits"], help="comma-separated benchmarks")
    sweep.add_argument("--tasks", type=_csv(int), default=None, help="e.g. 5,10,20 (benchmark default)")
    sweep.add_argument("--seeds", type=_csv(int), default=None, help="e.g. 1993,1994,1995")
    sweep.add_argument("--out", default="runs")
    sweep.add_argument("--name", default=None, help="sweep folder name (default: sweep-<timestamp>)")
    sweep.add_argument("--launcher", choices=("local", "slurm"), default="local")
    sweep.add_argument("--slurm-partition", default=None)
    sweep.add_argument("--gpus-per-run", type=int, default=1)
    sweep.add_argument("--cpus-per-run", type=int, default=8)
    sweep.add_argument("--mem-gb", type=int, default=64)
    sweep.add_argument("--timeout-min", type=int, default=240)
    sweep.add_argument("--max-parallel", type=int, default=None, help="array parallelism limit")
    for flag in ("--backbone", "--checkpoint", "--data-dir"):
        sweep.add_argument(flag, default=None)
    sweep.add_argument("--epochs", type=int, default=None)
    sweep.add_argument("--batch-size", type=int, default=None)
    sweep.add_argument("--lr", type=float, default=None)
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--plugin", dest="plugins", action="append", default=[])
    sweep.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sweep.add_argument("--workers", type=int, default=None)
    sweep.add_argument("--wandb", choices=WANDB_MODES, default="disabled")
    sweep.add_argument("--precision", choices=("bf16", "tf32", "fp32"), default=None)
    sweep.add_argument("--no-wait", action="store_true", help="submit and return without waiting")

    from clbench.perf.options import add_arguments as add_perf_arguments

    add_perf_arguments(sub.add_parser("perf", help="measure harness overhead, method costs and "
                                                   "end-to-end speed side by side"))

    report = sub.add_parser("report", help="comparison tables and plots from run folders")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default=None, help="report folder (default: reports/<name>)")
    report.add_argument("--name", default=None)
    report.add_argument("--metrics", nargs="+", default=None)
    report.add_argument("--wandb", choices=WANDB_MODES, default="disabled")
    report.add_argument("--compare-paper", action="store_true",
                        help="add the SD-LoRA paper's published numbers next to ours")
    return parser


def cmd_list(args) -> int:
    from clbench.backbones import BACKBONES
    from clbench.registry import BENCHMARKS, METHODS, static_entries

    for title, registry in (("methods", METHODS), ("benchmarks", BENCHMARKS)):
        print(f"{title}:")
        for entry in static_entries(registry, args.plugins):
            print(f"  {entry.name:<16} {entry.description}  [{entry.origin}]")
    print("backbones:")
    for spec in BACKBONES.values():
        print(f"  {spec.name:<30} {spec.tag}  — {spec.description}")
    return 0


def plan_from_args(args):
    import time

    from clbench.plan import RunPlan, load_plan

    if args.resume:
        defaults = build_parser().parse_args(["run"])
        if args.methods == "all":
            args.methods = None  # the same as no --methods
        given = [f for f in PLAN_FLAGS if getattr(args, f) != getattr(defaults, f)]
        if given:
            flags = ", ".join("--" + f.replace("_", "-").replace("overrides", "set") for f in given)
            raise UsageError(f"--resume continues {args.resume} exactly as planned; drop {flags} "
                             "(or start a new run with --name)")
        plan = load_plan(args.resume)
        plan.device, plan.wandb = args.device, args.wandb
        plan.decoded_cache = args.decoded_cache
        if args.workers != defaults.workers:
            plan.workers = args.workers
        return plan
    methods = None if args.methods in (None, "all") else [m.strip() for m in args.methods.split(",")]
    name = args.name or f"{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: give a plain folder name")
    def absolute(path):  # the plan must mean the same files when resumed from elsewhere
        return str(Path(path).resolve()) if path else path

    plugins = [absolute(p) if p.endswith(".py") else p for p in args.plugins]
    return RunPlan(run_dir=str(Path(args.out).resolve() / name), benchmark=args.bench, n_tasks=args.tasks,
                   methods=methods or [], seeds=args.seeds or [], backbone=args.backbone,
                   checkpoint=absolute(args.checkpoint), epochs=args.epochs, lr=args.lr,
                   batch_size=args.batch_size, overrides=args.overrides, plugins=plugins,
                   data_dir=absolute(args.data_dir), download=args.download, device=args.device,
                   workers=args.workers, wandb=args.wandb, precision=args.precision,
                   decoded_cache=args.decoded_cache)


def relaunch_with_torchrun(args, argv) -> int:
    """``clbench run --ddp`` = ``torchrun --nproc_per_node N -m clbench run ...``."""
    import os
    import subprocess

    nproc = args.nproc
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 2
    rest, skip = [], False
    for arg in argv:  # drop --ddp and --nproc N: the child processes are the workers
        if skip or arg == "--ddp" or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "clbench", *rest]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def cmd_run(args) -> int:
    import os

    from clbench import runner

    if args.ddp and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args, args.argv)

    plan = plan_from_args(args)
    try:
        paths = runner.run(plan, resuming=bool(args.resume))
    except KeyboardInterrupt:
        if not (Path(plan.run_dir) / "run.json").exists():  # written once data and backbone load
            print("\ninterrupted before training started (loading data, building the decoded "
                  "cache or loading the backbone): nothing was computed; rerun the same command",
                  file=sys.stderr)
        else:
            print(f"\ninterrupted: finished tasks are saved; continue with "
                  f"`clbench run --resume {plan.run_dir}`", file=sys.stderr)
        return 130
    print("results:")
    for path in paths:
        print(f"  {path}")
    from clbench import distributed

    if not distributed.is_main():
        return 0
    if not args.no_report:
        from clbench.report import write_report

        folder = write_report([Path(plan.run_dir)], out_dir=Path(plan.run_dir) / "report",
                              name=Path(plan.run_dir).name)
        print(f"report: {folder / 'summary.md'}")
    from clbench.schema import RunResult

    diverged = [p for p in paths if RunResult.read(p).status == "diverged"]
    if diverged:
        print(f"clbench: {len(diverged)} job(s) diverged (non-finite loss or weights); they are "
              "recorded as diverged and never ranked", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from clbench.report import write_report

    folder = write_report([Path(d) for d in args.run_dirs], out_dir=Path(args.out) if args.out else None,
                          name=args.name, metrics=args.metrics, wandb_mode=args.wandb,
                          compare_paper=args.compare_paper)
    print(f"report: {folder / 'summary.md'}")
    return 0


def cmd_sweep(args) -> int:
    from clbench.sweep import run_sweep

    return run_sweep(args)


def cmd_perf(args) -> int:
    from clbench.perf import run_perf

    return run_perf(args)


COMMANDS = {"list": cmd_list, "run": cmd_run, "report": cmd_report, "sweep": cmd_sweep,
            "perf": cmd_perf}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a bad flag already reported on one line
        return int(exit_.code or 0)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"clbench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
