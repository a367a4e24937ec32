"""``clbench perf`` options, without heavy imports (``clbench --help`` stays instant). The CLI's
``perf`` subparser and ``python -m clbench.perf`` both call ``add_arguments``; ``complete`` fills
the defaults of options a caller's parser lacks."""
from __future__ import annotations

import argparse

SECTIONS = ("harness", "methods", "sdlora", "loaders", "e2e", "losscurve")
DEFAULT_SECTIONS = ("harness", "methods", "sdlora", "loaders")


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--json", default="perf.json", help="where to write the figures")
    a("--shapes", choices=("tiny", "vit-b16"), default="tiny",
      help="model shapes (tiny: the shipped 16-px ViT; vit-b16: random-init ViT-B/16)")
    a("--repeats", type=int, default=5)
    a("--quick", action="store_true", help="fewer repeats, smaller batches")
    a("--sections", type=_names(SECTIONS), default=list(DEFAULT_SECTIONS),
      help=f"comma-separated, from {', '.join(SECTIONS)} (default: {','.join(DEFAULT_SECTIONS)})")
    a("--precisions", type=_names(("bf16", "tf32", "fp32")), default=None,
      help="precisions for model-only rates and e2e runs (default: bf16 on CUDA, fp32 on CPU)")
    a("--workers", type=int, default=None, help="data-loader workers (default: all cores)")
    e = parser.add_argument_group("e2e section (a synthetic ImageNet-R-shaped run)")
    e.add_argument("--e2e-data", default=None,
                   help="folder for the JPEG tree and runs (kept; default: a temporary folder)")
    e.add_argument("--e2e-method", default="sdlora")
    e.add_argument("--e2e-tasks", type=int, default=3)
    e.add_argument("--e2e-epochs", type=int, default=1)
    e.add_argument("--e2e-decoded-cache", action="store_true",
                   help="run with `clbench run --decoded-cache` (pixels decoded once)")
    e.add_argument("--e2e-classes-per-task", type=int, default=20, help="ImageNet-R 10 tasks: 20")
    e.add_argument("--e2e-train-per-class", type=int, default=120)
    e.add_argument("--e2e-test-per-class", type=int, default=30)
    e.add_argument("--e2e-side", type=int, default=448, help="JPEG side in pixels")
    e.add_argument("--e2e-seed", type=int, default=1995)
    e.add_argument("--e2e-model-steps", type=int, default=10, help="timed model-only steps")
    c = parser.add_argument_group("losscurve section (bf16 vs fp32 training loss)")
    c.add_argument("--losscurve-steps", type=int, default=100)
    c.add_argument("--losscurve-batch", type=int, default=64)
    c.add_argument("--losscurve-lr", type=float, default=1e-4)
    c.add_argument("--losscurve-precisions", dest="precisions_losscurve",
                   type=_names(("bf16", "tf32", "fp32")), default=["bf16", "fp32"])
    return parser


def complete(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults for every option ``args`` lacks (a parser that predates some of them)."""
    defaults = add_arguments(argparse.ArgumentParser(add_help=False)).parse_args([])
    for key, value in vars(defaults).items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args
