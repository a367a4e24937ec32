"""``clbench perf``: what the harness, each method and the data path cost, measured side by side
in one process.

Sections (``--sections``, on the current device; medians of repeated timings, pairs interleaved
so a shared machine's load drifts over both sides alike):

- ``harness`` (``harness.py``): one ``finetune`` epoch through ``CLStrategy.train`` vs a bare loop;
- ``methods`` (``methods.py``): every method's training step and evaluation per image ÷ the plain
  backbone, and peak memory;
- ``sdlora`` (``sdlora_scaling.py``): SD-LoRA's step time while learning task 20 ÷ task 1;
- ``loaders`` (``loaders.py``): training/test loader images/s with all cores as workers vs the
  model's training images/s at the default precision (bf16 on CUDA);
- ``e2e`` (``e2e.py``, opt-in): a few ImageNet-R-sized tasks through ``clbench run`` on a synthetic
  JPEG tree, next to the model-only and loader-only rates, and the official schedule's run time;
- ``losscurve`` (``losscurve.py``, opt-in): one short training per precision, same init and data.

On CPU the timing sections run on one thread (see ``run_perf``). Every figure is also written to
``--json`` so commits can be compared. Modules import torch/Avalanche only when a section runs.
"""
from __future__ import annotations


def run_perf(args) -> int:
    import torch

    from clbench.distributed import all_cores
    from clbench.errors import UsageError
    from clbench.perf.options import complete
    from clbench.perf.timing import default_precisions
    from clbench.plan import resolve_device

    args = complete(args)
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    device = resolve_device(args.device)
    args.precisions = args.precisions or default_precisions(device)
    args.workers = all_cores() if args.workers is None else args.workers
    if args.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if "e2e" in args.sections and (args.e2e_tasks < 1 or args.e2e_epochs < 1):
        raise UsageError("--e2e-tasks and --e2e-epochs must be at least 1")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One thread: on a shared CPU, multi-threaded timings are dominated by OpenMP threads
        # waiting for each other (measured here: tiny ViT step median 600 ms with 2 threads vs
        # 79 ms with 1 at load 13 on 2 cores). Ratios, the figures that matter, are per core.
        torch.set_num_threads(1)
    try:
        return _measure_and_report(args, device)
    finally:
        torch.set_num_threads(threads)


def _measure_and_report(args, device) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from clbench.perf.report import print_report
    from clbench.perf.setup import make_backbone, shapes_for
    from clbench.perf.timing import PeakMemory, environment

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    shapes = shapes_for(args.shapes, args.quick, args.repeats, cuda=device.type == "cuda")
    figures = {"shapes": shapes.name, "batch": shapes.batch, "eval_batch": shapes.eval_batch,
               "quick": args.quick, "sections": args.sections, "precisions": args.precisions,
               "environment": environment(device), "memory_kind": PeakMemory(device).kind}
    started = time.perf_counter()
    if "e2e" in args.sections:  # first: its JPEG pool forks before any other work
        from clbench.perf.e2e import measure_e2e

        figures["e2e"] = measure_e2e(args, device, log)
    timing = [s for s in ("harness", "methods", "sdlora", "loaders") if s in args.sections]
    if timing:
        backbone, mean, std = make_backbone(shapes)
    if "harness" in args.sections:
        from clbench.perf.harness import measure_harness

        log("perf: harness overhead …")
        # Measured on digits, hence on the tiny backbone whatever --shapes says.
        tiny = (backbone, mean, std) if shapes.name == "tiny" else \
            make_backbone(shapes_for("tiny", True, 1))
        figures["harness"] = measure_harness(*tiny, device, args.repeats, args.quick)
    if "methods" in args.sections:
        from clbench.perf.methods import measure_methods

        log("perf: plain backbone and methods …")
        figures["plain_backbone"], figures["methods"] = measure_methods(
            backbone, mean, std, shapes, device, log)
    if "sdlora" in args.sections:
        from clbench.perf.sdlora_scaling import measure_sdlora_scaling

        log("perf: SD-LoRA over 20 tasks …")
        try:
            figures["sdlora_scaling"] = measure_sdlora_scaling(backbone, mean, std, shapes, device)
        except Exception as exc:
            figures["sdlora_scaling"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    if "loaders" in args.sections:
        from clbench.perf.loaders import measure_loaders
        from clbench.perf.model_only import model_rates

        log("perf: data loaders …")
        default = "bf16" if device.type == "cuda" else "fp32"
        model = model_rates(backbone, default, shapes.batch, device, steps=3 if args.quick else 10)
        figures["loaders"] = measure_loaders(shapes, device, model["train_images_per_s"], default,
                                             args.workers, args.quick, log)
    if "losscurve" in args.sections:
        from clbench.perf.losscurve import measure_losscurve

        figures["losscurve"] = measure_losscurve(args, device, log)
    figures["seconds"] = time.perf_counter() - started
    print_report(figures)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print(f"\nfigures: {args.json} ({figures['seconds']:.0f} s)")
    return 0
