"""``clbench run --dry-run``: the prepared plan as text — what would run, with every job's
hyperparameters and where each value comes from — so a reviewer reads the configuration of
every experiment without loading data, downloading weights or writing a file."""
from __future__ import annotations

from clbench.hparams import as_dict


def _table(values: dict, sources, indent: str = "    ") -> list[str]:
    if not values:
        return [f"{indent}(no options)"]
    shown = {name: repr(value) for name, value in values.items()}
    width = max(map(len, shown))
    value_width = min(max(map(len, shown.values())), 40)
    return [f"{indent}{name:<{width}}  {text:<{value_width}}  {sources.get(name, '')}".rstrip()
            for name, text in shown.items()]


def describe(prepared) -> str:
    """Every job's resolved configuration, grouped by method (a method's seeds share it)."""
    from clbench.backbones import spec_for

    plan, bench = prepared.plan, prepared.benchmark
    spec = spec_for(prepared.backbone)
    weights = plan.checkpoint or ("shipped with clbench" if spec.file else "timm hub / local cache")
    context = prepared.jobs[0].context
    if prepared.workers is None:
        workers = "all cores for image data, 0 for tensors in memory (decided when data loads)"
    else:
        workers = str(prepared.workers)
    lines = [
        "clbench run --dry-run: nothing was loaded, downloaded or written",
        f"run folder  {plan.run_dir}" + ("  (resumed)" if prepared.resuming else ""),
        f"benchmark   {bench.name}: {prepared.n_tasks} tasks, classes per task "
        f"{list(context.classes_per_task)}; data root {bench.root}"
        + (" (download allowed)" if plan.download else ""),
        *_table(as_dict(bench.config), prepared.benchmark_sources),
        f"backbone    {spec.name} = {spec.tag} ({context.backbone_depth} blocks, width "
        f"{context.embed_dim}); weights: {weights}",
        f"device      {prepared.device}; precision {prepared.precision}; loader workers "
        f"{workers}; processes {prepared.processes}",
        f"tracking    W&B {plan.wandb}; decoded cache {'on' if plan.decoded_cache else 'off'}",
    ]
    for method in dict.fromkeys(job.method for job in prepared.jobs):
        jobs = [job for job in prepared.jobs if job.method == method]
        lines.append("")
        lines.append(f"{method}: {len(jobs)} job(s)")
        lines += [f"  seed {job.seed} → {job.out_dir}" for job in jobs]
        lines += _table(as_dict(jobs[0].config), jobs[0].sources)
    return "\n".join(lines)
