"""The text report of sections 1–4 (the e2e and losscurve sections print their own)."""
from __future__ import annotations

import sys


def _ms(seconds) -> str:
    return "—" if seconds is None or seconds != seconds else f"{seconds * 1e3:.2f}"


def print_report(figures: dict, out=None) -> None:
    """Print every section present in ``figures``, in order."""
    out = out or sys.stdout
    from clbench.perf.e2e import print_e2e
    from clbench.perf.losscurve import print_losscurve

    p = lambda *a: print(*a, file=out)  # noqa: E731
    env = figures["environment"]
    p(f"clbench perf — device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
      f"{env['threads']} threads, {env.get('cores')} cores, shapes {figures['shapes']}, "
      f"load avg {env.get('load_average')}")
    printers = {"harness": _harness, "methods": _methods, "sdlora_scaling": _sdlora, "loaders": _loaders}
    for key, printer in printers.items():
        if key in figures:
            printer(figures, p)
    if "e2e" in figures:
        print_e2e(figures["e2e"], p)
    if "losscurve" in figures:
        print_losscurve(figures["losscurve"], p)


def _harness(figures, p) -> None:
    h = figures["harness"]
    p(f"\n1. harness overhead: finetune, one epoch of digits task 1 ({h['images']} images, "
      f"{h['steps']} steps of {h['batch_size']})")
    p(f"   clbench train() {h['clbench_s']:.3f} s   bare loop {h['bare_s']:.3f} s   "
      f"ratio {h['ratio']:.3f}× (target ≤ {h['target']}) {'OK' if h['ok'] else 'ABOVE TARGET'}")


def _methods(figures, p) -> None:
    plain, methods = figures["plain_backbone"], figures["methods"]
    tasks = {m["tasks_trained"] for m in methods.values() if "tasks_trained" in m}
    after = f"; train step of task {max(tasks)} and evaluation after it" if tasks else ""
    p(f"\n2. methods ({figures['shapes']}: batch {figures['batch']}, eval batch "
      f"{figures['eval_batch']}{after}); × plain = ÷ the plain backbone in a bare loop, "
      "measured next to each method (the plain row is the median of those)")
    p(f"   memory: {figures['memory_kind']}")
    header = ("method", "train step ms", "× plain", "eval ms/img", "× plain", "fwd/img", "peak MiB")
    rows = [("plain backbone", _ms(plain["train_step_s"]), "1.00",
             f"{plain['eval_s_per_image'] * 1e3:.3f}", "1.00", "1", f"{plain['peak_mib']:.0f}")]
    skipped = []
    for name, m in methods.items():
        if "skipped" in m:
            skipped.append((name, m["skipped"]))
            continue
        rows.append((name, _ms(m["train_step_s"]), f"{m['train_step_vs_plain']:.2f}",
                     f"{m['eval_s_per_image'] * 1e3:.3f}", f"{m['eval_vs_plain']:.2f}",
                     str(m["forward_passes_per_image"]), f"{m['peak_mib']:.0f}"))
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        p("   " + "  ".join(v.ljust(w) if k == 0 else v.rjust(w)
                            for k, (v, w) in enumerate(zip(row, widths))))
    for name, reason in skipped:
        p(f"   {name}: skipped — {reason}")


def _sdlora(figures, p) -> None:
    s = figures["sdlora_scaling"]
    p(f"\n3. SD-LoRA step time after 20 tasks ÷ after 1 task ({s.get('source', '')})")
    if "skipped" in s:
        p(f"   skipped — {s['skipped']}")
        return
    n = s["tasks"]
    p(f"   train step: task 1 {_ms(s['step_task1_s'])} ms, task {n} {_ms(s[f'step_task{n}_s'])} ms"
      f" → {s['step_ratio']:.3f}× (target ≤ {s['target']}) {'OK' if s['ok'] else 'ABOVE TARGET'}")
    p(f"   inference: task 1 {s['eval_task1_s_per_image'] * 1e3:.3f} ms/img, task {n} "
      f"{s[f'eval_task{n}_s_per_image'] * 1e3:.3f} ms/img → {s['eval_ratio']:.3f}×")


def _loaders(figures, p) -> None:
    p("\n4. data loaders vs model (training images/s)")
    for name, d in figures["loaders"].items():
        model = d.get("model_train_images_per_s")
        if "loader_images_per_s" in d:
            rate = best = d["loader_images_per_s"]
            text = f"{rate:.0f} img/s ({d['workers']} workers)"
        else:
            best = d["train_images_per_s"]
            text = (f"train {best:.0f} img/s, test {d['test_images_per_s']:.0f} img/s "
                    f"({d['workers']} workers)")
        verdict = ("" if model is None else
                   f"; model ({d.get('model_precision', 'fp32')}) {model:.0f} img/s → loader "
                   f"{'is NOT' if best >= model else 'IS'} the bottleneck")
        p(f"   {name} (input {d['input_size']}px): loader {text}{verdict}")
        if d.get("note"):
            p(f"      ({d['note']})")
