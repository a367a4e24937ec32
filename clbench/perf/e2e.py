"""Section ``e2e``: a few ImageNet-R-sized tasks of a method through the real ``clbench run`` path
on a synthetic JPEG tree, next to the model-only and loader-only images/s measured in the same
process, as ratios, plus the official schedule's run time extrapolated from the measured rates.

Per precision: the plain ViT's train-step / eval-forward images/s (``model_only``), then
the same plan ``clbench run ... --precision p`` builds, executed by ``clbench.runner.run``; the run's ``seconds_per_task`` and evaluated counts give its train and eval images/s. The loader
(``ImageFiles`` + official transforms, all cores as workers) is measured once. Rates of task 1
include start-up (kernel selection, first worker start), so the steady rates use tasks 2+. The
training rate counts from each task's first step (``to_first_step`` in ``seconds_per_task``), as
the loader's from its first batch; the time before it is added once per task to the schedule.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from clbench.perf import jpeg_tree
from clbench.perf.loaders import tree_loader_rates
from clbench.perf.model_only import model_rates
from clbench.perf.setup import make_backbone, shapes_for

# SD-LoRA's official ImageNet-R schedule: 10 tasks × 20 classes, 20 epochs, eval after each task.
OFFICIAL = {"tasks": 10, "epochs": 20, "train_per_task": 2400, "test_per_task": 600}
TARGETS = {"train": 0.85, "eval": 0.80}  # of min(model, loader), issue 13


def run_backbone(shapes_name: str, root: Path) -> tuple[str, str | None]:
    """(backbone, checkpoint) of the run: the shipped tiny ViT, or a random-init ViT-B/16
    written as a safetensors checkpoint (the weights do not change the speed)."""
    if shapes_name == "tiny":
        return "vit-tiny-letters", None
    path = root / "vit_b16_random_init.safetensors"
    if not path.is_file():
        from safetensors.torch import save_file

        model, _, _ = make_backbone(shapes_for("vit-b16", True, 1), num_classes=1000)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        del model
    return "vit-b16-in21k-ft-in1k", str(path)


def method_batches(method: str, tasks: int, epochs: int) -> tuple[int, int]:
    from clbench.registry import METHODS
    from clbench.plan import RunPlan, method_config

    config = method_config(METHODS.get(method), "imagenet-r", tasks, RunPlan("", epochs=epochs), [])
    return config.batch_size, config.eval_batch_size


def run_rates(results: dict, train_per_task: int, epochs: int) -> dict:
    """Per-task images and seconds from a results.json, and the all-task and steady rates.

    The training rate counts from each task's first step, like the loader-alone rate from its
    first batch; the time before it (the method's setup and the loader's first batch,
    ``to_first_step``) is a cost per task, kept apart and added once per task to the official
    schedule, instead of scaled with the epochs."""
    tasks = [{"train_images": train_per_task * epochs, "train_s": s["train"],
              "to_first_step_s": s.get("to_first_step", 0.0),
              "eval_images": int(sum(total)), "eval_s": s["eval"]}
             for s, total in zip(results["seconds_per_task"], results["total"])]
    steady = tasks[1:] if len(tasks) > 1 else tasks

    def rate(rows, kind, start=False):
        seconds = sum(r[f"{kind}_s"] - (r["to_first_step_s"] if start else 0) for r in rows)
        return sum(r[f"{kind}_images"] for r in rows) / seconds

    return {"tasks": tasks, "train_images_per_s": rate(steady, "train", start=True),
            "eval_images_per_s": rate(steady, "eval"),
            "train_images_per_s_with_start": rate(steady, "train"),
            "to_first_step_s": sum(r["to_first_step_s"] for r in steady) / len(steady),
            "train_images_per_s_all_tasks": rate(tasks, "train"),
            "eval_images_per_s_all_tasks": rate(tasks, "eval"),
            "steady_from_task": 2 if len(tasks) > 1 else 1}


def official_schedule(train_ips: float, eval_ips: float, to_first_step_s: float = 0.0) -> dict:
    """Seconds of the official schedule at the measured rates, plus each task's time to its
    first step (setup and the loader's first batch) once per task."""
    n = OFFICIAL["tasks"]
    train_images = n * OFFICIAL["epochs"] * OFFICIAL["train_per_task"]
    eval_images = OFFICIAL["test_per_task"] * n * (n + 1) // 2
    train_s = n * to_first_step_s + train_images / train_ips
    eval_s = eval_images / eval_ips
    return {**OFFICIAL, "train_images": train_images, "eval_images": eval_images,
            "to_first_step_s": to_first_step_s,
            "train_s": train_s, "eval_s": eval_s, "total_s": train_s + eval_s,
            "total_min": (train_s + eval_s) / 60}


def ratios(run: dict, model: dict, loader: dict) -> dict:
    out = {}
    for kind, loader_key in (("train", "train_images_per_s"), ("eval", "test_images_per_s")):
        mine, m, ld = run[f"{kind}_images_per_s"], model[f"{kind}_images_per_s"], loader[loader_key]
        out[f"{kind}_vs_model"] = mine / m
        out[f"{kind}_vs_loader"] = mine / ld
        out[f"{kind}_vs_floor"] = mine / min(m, ld)
        out[f"{kind}_target"] = TARGETS[kind]
        out[f"{kind}_ok"] = mine / min(m, ld) >= TARGETS[kind]
    return out


def measure_e2e(args, device, log) -> dict:
    spec = jpeg_tree.TreeSpec(classes=args.e2e_tasks * args.e2e_classes_per_task,
                              train_per_class=args.e2e_train_per_class,
                              test_per_class=args.e2e_test_per_class, side=args.e2e_side)
    keep = tempfile.TemporaryDirectory(prefix="clbench-perf-e2e-") if not args.e2e_data else None
    root = Path(args.e2e_data or keep.name)
    try:
        return _measure(args, spec, root, device, log)
    finally:
        if keep is not None:
            keep.cleanup()


def _measure(args, spec, root: Path, device, log) -> dict:
    from clbench.backbones import input_size, spec_for
    from clbench.plan import RunPlan
    from clbench.runner import run as run_plan

    log(f"perf e2e: writing {spec.n_train + spec.n_test} JPEGs under {root} …")
    tree = jpeg_tree.generate(root, spec)
    shapes = shapes_for(args.shapes, True, 1)
    backbone, checkpoint = run_backbone(shapes.name, root)
    size = input_size(spec_for(backbone))
    batch, eval_batch = method_batches(args.e2e_method, args.e2e_tasks, args.e2e_epochs)
    workers = args.workers
    log(f"perf e2e: loader alone ({workers} workers) …")
    loader, loader_jpeg = tree_loader_rates(root, size, batch, workers, device), None
    if args.e2e_decoded_cache:  # the run reads the same cache (same folder and file list)
        log(f"perf e2e: loader alone, decoded cache ({workers} workers) …")
        loader, loader_jpeg = tree_loader_rates(root, size, batch, workers, device,
                                                decoded_cache=root / ".decoded"), loader
    plain, _, _ = make_backbone(shapes)
    figures = {"tree": {**tree, "root": str(root)}, "method": args.e2e_method,
               "tasks": args.e2e_tasks, "epochs": args.e2e_epochs, "backbone": backbone,
               "shapes": shapes.name, "input_size": size, "batch": batch, "eval_batch": eval_batch,
               "workers": workers, "loader": loader, "loader_jpeg": loader_jpeg,
               "decoded_cache": args.e2e_decoded_cache,
               "official": OFFICIAL, "precisions": {}}
    for p in args.precisions:
        log(f"perf e2e [{p}]: model alone …")
        model = model_rates(plain, p, batch, device, steps=args.e2e_model_steps,
                            eval_batch=eval_batch, n_classes=args.e2e_classes_per_task)
        name = f"e2e-{p}"
        shutil.rmtree(root / "runs" / name, ignore_errors=True)  # a finished run would be skipped
        plan = RunPlan(
            run_dir=str(root / "runs" / name), benchmark="imagenet-r-synthetic",
            n_tasks=args.e2e_tasks, methods=[args.e2e_method], seeds=[args.e2e_seed],
            backbone=backbone, checkpoint=checkpoint,
            epochs=args.e2e_epochs, plugins=["clbench.perf.synthetic_bench"], data_dir=str(root),
            device=device.type, workers=workers, precision=p,
            decoded_cache=args.e2e_decoded_cache)
        log(f"perf e2e [{p}]: clbench run {plan}")
        try:
            run_plan(plan, log=log)
            error = None
        except Exception as exc:  # recorded beside the other precisions' figures
            error = f"{type(exc).__name__}: {exc}"
        found = sorted((root / "runs" / name).rglob("results.json"))
        if error or len(found) != 1:
            figures["precisions"][p] = {"model": model, "error": f"clbench run failed ({error}) "
                                        f"and wrote {len(found)} results.json"}
            continue
        path = found[0]
        results = json.loads(path.read_text())
        run = run_rates(results, args.e2e_classes_per_task * spec.train_per_class, args.e2e_epochs)
        run["results"] = str(path)
        run["run_precision"] = results.get("precision", "fp32 (run has no precision field)")
        figures["precisions"][p] = {
            "model": model, "run": run, "ratios": ratios(run, model, loader),
            "official_schedule": official_schedule(run["train_images_per_s"],
                                                   run["eval_images_per_s"], run["to_first_step_s"])}
    return figures


def print_e2e(e: dict, p=print) -> None:
    t = e["tree"]
    p(f"\ne2e. {e['method']}, {e['tasks']} tasks × {e['epochs']} epoch(s) through `clbench run` on "
      f"a synthetic ImageNet-R-shaped tree ({t['n_train']} train / {t['n_test']} test JPEGs of "
      f"{t['spec']['side']}px, {t['mean_kb']:.0f} KB), backbone {e['backbone']} at "
      f"{e['input_size']}px, batch {e['batch']}, {e['workers']} workers")
    for ld in filter(None, (e.get("loader_jpeg"), e["loader"])):
        p(f"   loader alone ({ld['source']}): train {ld['train_images_per_s']:.0f} img/s, test "
          f"{ld['test_images_per_s']:.0f} img/s")
    for name, r in e["precisions"].items():
        m = r["model"]
        p(f"   [{name}] model alone: train {m['train_images_per_s']:.0f} img/s, eval "
          f"{m['eval_images_per_s']:.0f} img/s")
        if "error" in r:
            p(f"   [{name}] run failed: {r['error']}")
            continue
        run, q, o = r["run"], r["ratios"], r["official_schedule"]
        for kind in ("train", "eval"):
            p(f"   [{name}] run {kind}: {run[f'{kind}_images_per_s']:.0f} img/s (tasks "
              f"{run['steady_from_task']}+{', from the first step' if kind == 'train' else ''}) = "
              f"{q[f'{kind}_vs_model']:.2f}× model, "
              f"{q[f'{kind}_vs_loader']:.2f}× loader, {q[f'{kind}_vs_floor']:.2f}× min "
              f"(target ≥ {q[f'{kind}_target']}) {'OK' if q[f'{kind}_ok'] else 'BELOW TARGET'}")
        p(f"   [{name}] to the first step: {run['to_first_step_s']:.2f} s per task (setup and the "
          f"loader's first batch); with it, train {run['train_images_per_s_with_start']:.0f} img/s")
        p(f"   [{name}] official schedule ({o['tasks']} tasks × {o['epochs']} epochs): train "
          f"{o['train_s'] / 60:.1f} min (with {o['tasks']} × {o['to_first_step_s']:.2f} s to the "
          f"first step) + eval {o['eval_s'] / 60:.1f} min = {o['total_min']:.1f} min")
