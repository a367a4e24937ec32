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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def shared_flags() -> argparse.ArgumentParser:
    """The flags ``run`` and ``sweep`` share, declared once. Their ``dest`` names are the
    ``RunPlan`` fields they set (``plan.plan_from_args`` reads them by that name)."""
    shared = OneLineParser(add_help=False)
    a = shared.add_argument
    a("--methods", default=None, help="comma-separated method names, or 'all' (run's default: "
                                      "every built-in method; sweep: required)")
    a("--seeds", type=_csv(int), default=None, help="e.g. 1993,1994 (benchmark default)")
    a("--backbone", default=None, help="backbone short name or timm name")
    a("--checkpoint", default=None, help="local .safetensors/.pth weights for the backbone")
    a("--epochs", type=int, default=None, help="override every method's epochs")
    a("--batch-size", type=int, default=None, help="override every method's batch size")
    a("--lr", type=float, default=None, help="override every method's learning rate (and scale "
                                             "the other rates each method lists in lr_scaled_fields)")
    a("--data-dir", default=None, help="data root (else $CLBENCH_DATA, else ~/.cache/clbench)")
    a("--out", default="runs", help="output folder (default: runs)")
    a("--name", default=None, help="run or sweep folder name (default: <bench>-<timestamp>, "
                                   "sweep-<timestamp>)")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="hyperparameter override, e.g. --set sdlora.ranks=[8] or --set split=coda")
    a("--plugin", dest="plugins", action="append", default=[], metavar="FILE_OR_MODULE",
      help="python file or module that registers methods/benchmarks")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--workers", type=int, default=None,
      help="data-loader worker processes (default: all cores for image benchmarks on a GPU, "
           "else 0; changes no number: augmentation is seeded per sample)")
    a("--wandb", choices=WANDB_MODES, default="disabled")
    a("--precision", choices=("bf16", "tf32", "fp32"), default=None,
      help="bf16 autocast (default on CUDA), tf32, or fp32 (default on CPU)")
    return shared


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="clbench", description="Continual-learning benchmark harness for pretrained ViTs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    listing = sub.add_parser("list", help="list methods, benchmarks and backbones")
    listing.add_argument("--plugin", dest="plugins", action="append", default=[],
                         metavar="FILE", help="also list what a plugin file registers")

    shared = shared_flags()
    run = sub.add_parser("run", parents=[shared],
                         help="train methods class-incrementally and write results + report")
    run.add_argument("--bench", dest="benchmark", default="digits",
                     help="benchmark name (default: digits, embedded)")
    run.add_argument("--tasks", dest="n_tasks", type=int, default=None,
                     help="number of tasks (benchmark default)")
    run.add_argument("--download", action="store_true", help="download missing data (verified)")
    run.add_argument("--decoded-cache", action="store_true",
                     help="decode each image file once into <data>/.decoded/ (disk: w×h×3 bytes "
                          "per image) and read pixels from there; the samples stay identical")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a killed run")
    run.add_argument("--dry-run", action="store_true",
                     help="print every job's resolved configuration and the source of each value, "
                          "then exit without loading data or weights or writing anything")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("--ddp", action="store_true",
                     help="data-parallel over --nproc processes via torchrun (gloo on CPU, nccl on GPU)")
    run.add_argument("--nproc", type=int, default=None,
                     help="processes for --ddp (default: number of GPUs, else 2)")

    sweep = sub.add_parser("sweep", parents=[shared],
                           help="run a methods × benchmarks × tasks × seeds grid with submitit")
    sweep.add_argument("--bench", dest="benchmarks", type=_csv(str), default=["digits"],
                       help="comma-separated benchmarks")
    sweep.add_argument("--tasks", dest="task_counts", type=_csv(int), default=None,
                       help="e.g. 5,10,20 (benchmark default)")
    sweep.add_argument("--launcher", choices=("local", "slurm"), default="local")
    sweep.add_argument("--slurm-partition", default=None)
    sweep.add_argument("--gpus-per-run", type=int, default=1)
    sweep.add_argument("--cpus-per-run", type=int, default=8)
    sweep.add_argument("--mem-gb", type=int, default=64)
    sweep.add_argument("--timeout-min", type=int, default=240)
    sweep.add_argument("--max-parallel", type=int, default=None, help="array parallelism limit")
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
                        help="add the published figures of the same protocol and split next to ours")
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


def _nproc(args) -> int:
    """``--nproc``, else one process per GPU, else 2."""
    if args.nproc is not None:
        return args.nproc
    import torch

    return torch.cuda.device_count() or 2


def relaunch_with_torchrun(args, argv) -> int:
    """``clbench run --ddp`` = ``torchrun --nproc_per_node N -m clbench run ...``."""
    import os
    import subprocess

    nproc = _nproc(args)
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

    if args.ddp and not args.dry_run and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args, args.argv)

    from clbench.plan import plan_from_args, prepare

    defaults = build_parser().parse_args(["run"]) if args.resume else None
    plan = plan_from_args(args, defaults=defaults)
    if args.dry_run:
        from clbench.dryrun import describe

        ddp = args.ddp and "WORLD_SIZE" not in os.environ  # the processes torchrun would start
        print(describe(prepare(plan, resuming=bool(args.resume),
                               processes=_nproc(args) if ddp else None)))
        return 0
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
