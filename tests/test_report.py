"""Tests for clbench.report and clbench.tracking on synthetic results files with known numbers.

Fast: every report here is a few small synthetic runs. The module-scoped report fixture draws
figures once (about 3 s); everything else reuses it or writes a handful of runs."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from clbench import metrics as M  # noqa: E402
from clbench import report, tracking  # noqa: E402
from clbench.errors import UsageError  # noqa: E402

TOTAL = 200  # test samples per task: accuracies in steps of 0.5 %


@pytest.fixture(autouse=True)
def _figures_only_when_asked(request, monkeypatch):
    """Drawing figures costs ~0.5 s a report: only tests that use ``real_figures`` (or the shared
    module report) draw them; the others get no figures."""
    if "real_figures" not in request.fixturenames and "abc_report" not in request.fixturenames:
        monkeypatch.setattr(report, "_write_figures", lambda groups, out: {})


@pytest.fixture
def real_figures():
    return True


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def write_results(root: Path, method: str, seed: int, acc: list[list[float]], *,
                  benchmark: str = "imagenet-r", n_tasks: int | None = None,
                  split_hash: str = "hash-a", protocol: str = "sdlora",
                  class_order: list[int] | None = None, complete: bool | None = None,
                  totals: list[int] | None = None, stored_metrics: dict | None = None,
                  params: list[int] | None = None, train_s: float = 10.0,
                  hparams: dict | None = None, status: str | None = None,
                  precision: str = "fp32", gflops: float | None = None,
                  method_info: list[dict] | None = None, config_extra: dict | None = None,
                  classes_per_task: list[int] | None = None) -> Path:
    """Write ``<root>/<benchmark>-<n>tasks/<method>/seed-<k>/{config,results}.json``.

    ``acc[i][j]`` is the accuracy (%) on task j after task i; counts are built from it with
    ``totals[j]`` test samples per task (default 200 each). ``complete`` writes the old format
    (a ``complete`` flag, no ``status``); ``status`` the current schema's field."""
    rows = len(acc)
    n_tasks = n_tasks or rows
    totals = totals or [TOTAL] * n_tasks
    correct = [[round(acc[i][j] * totals[j] / 100) for j in range(i + 1)] for i in range(rows)]
    total = [[totals[j] for j in range(i + 1)] for i in range(rows)]
    run = root / f"{benchmark}-{n_tasks}tasks" / method / f"seed-{seed}"
    run.mkdir(parents=True, exist_ok=True)
    order = class_order if class_order is not None else [(c + seed) % (2 * n_tasks)
                                                         for c in range(2 * n_tasks)]
    data = {
        "method": method, "benchmark": benchmark, "seed": seed, "n_tasks": n_tasks,
        "class_order": order, "classes_per_task": classes_per_task or [2] * n_tasks,
        "correct": correct, "total": total,
        "metrics": stored_metrics if stored_metrics is not None
        else (M.summarize(correct, total) if rows else {}),
        "trainable_params": params or [1000 * (k + 1) for k in range(rows)],
        "forward_passes_per_image": 1,
        "seconds_per_task": [{"train": train_s, "eval": 1.0} for _ in range(rows)],
        "split": {"protocol": protocol, "hash": split_hash},
        "precision": precision, "gflops_per_image": gflops,
        "method_info": method_info or [{} for _ in range(rows)],
    }
    if status is not None:
        data["status"] = status
    else:
        data["complete"] = (rows == n_tasks) if complete is None else complete
    (run / "results.json").write_text(json.dumps(data))
    config = {"method": method, "benchmark": benchmark, "seed": seed,
              "hparams": hparams or {"lr": 0.01}, "backbone": {"name": "vit_tiny", "tag": "t"},
              **(config_extra or {})}
    (run / "config.json").write_text(json.dumps(config))
    return run


def md_rows(md: str, first: str = "| Method") -> dict[str, dict[str, str]]:
    """The first Markdown table whose header starts with ``first``: {method: {header: cell}}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header = cells(lines[start])
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, cells(line)))
        rows[row[header[0]]] = row
    return rows


def tex_tables(tex: str) -> list[dict]:
    """Each ``table`` float of summary.tex: caption, label, column spec, header, rows, note."""
    tables = []
    for block in tex.split("\\begin{table}")[1:]:
        body = block.split("\\midrule\n")[1].split("\\bottomrule")[0]
        tables.append({
            "caption": block.split("\\caption{")[1].split("}\n")[0],
            "label": block.split("\\label{")[1].split("}")[0],
            "spec": block.split("\\begin{tabular}{")[1].split("}")[0],
            "header": [c.strip() for c in
                       block.split("\\toprule\n")[1].split("\\\\")[0].split(" & ")],
            "rows": [[c.strip() for c in line.rstrip(" \\").split(" & ")]
                     for line in body.strip().splitlines()],
            "note": block.split("\\footnotesize ")[1].split("\n\\end{table}")[0]})
    return tables


def mat3(final_first: float, *, diag=(95.0, 94.0, 93.0), mid=90.0, final_rest=(88.0,)):
    """3-task accuracy matrix whose last row starts with ``final_first``."""
    return [[diag[0]], [mid, diag[1]], [final_first, *final_rest, diag[2]]]


def final_mean(acc):  # pooled accuracy with equal test-set sizes = plain mean of the last row
    return sum(acc[-1]) / len(acc[-1])


# A: best; B: clearly worse on every seed; C: nearly equal to A (slightly lower mean).
A_FIRST = {0: 85.0, 1: 86.0, 2: 87.0}
B_FIRST = {0: 60.0, 1: 62.0, 2: 61.0}
C_FIRST = {0: 84.0, 1: 84.0, 2: 87.0}  # A - C: 1, 2, 0 -> p ~ 0.23


def abc_runs(root: Path) -> Path:
    for seed in range(3):
        write_results(root, "sdlora", seed, mat3(A_FIRST[seed]), params=[500, 700, 900],
                      train_s=20.0)
        write_results(root, "l2p", seed, mat3(B_FIRST[seed]), train_s=5.0)
        write_results(root, "inflora", seed, mat3(C_FIRST[seed]), train_s=30.0)
    # D: a single seed only, clearly worse: never tested for significance.
    write_results(root, "dualprompt", 0, mat3(50.0))
    return root


@pytest.fixture(scope="module")
def abc_report(tmp_path_factory):
    root = abc_runs(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    path = report.write_report([root], out_dir=out, name="abc")
    return path, pd.read_csv(path / "summary.csv").set_index("row")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def test_mean_std_and_seed_count(abc_report):
    _, df = abc_report
    for method, firsts in (("sdlora", A_FIRST), ("l2p", B_FIRST), ("inflora", C_FIRST)):
        finals = [final_mean(mat3(firsts[s])) for s in range(3)]
        assert df.loc[method, "final_acc_mean"] == pytest.approx(statistics.fmean(finals))
        assert df.loc[method, "final_acc_std"] == pytest.approx(statistics.stdev(finals))
        assert df.loc[method, "n_seeds"] == 3
    # one seed: mean only, std empty
    assert df.loc["dualprompt", "n_seeds"] == 1
    assert math.isnan(df.loc["dualprompt", "final_acc_std"])
    assert df.loc["dualprompt", "final_acc_mean"] == pytest.approx(final_mean(mat3(50.0)))
    # AAA: mean over the accuracy curve; forgetting of A seed 0 = ((95-85) + (94-88)) / 2
    curve = [95.0, (90 + 94) / 2, final_mean(mat3(85.0))]
    aaa = [statistics.fmean([95.0, 92.0, final_mean(mat3(A_FIRST[s]))]) for s in range(3)]
    assert statistics.fmean(curve) == pytest.approx(aaa[0])
    assert df.loc["sdlora", "avg_inc_acc_mean"] == pytest.approx(statistics.fmean(aaa))
    fgt = [((95 - A_FIRST[s]) + (94 - 88)) / 2 for s in range(3)]
    assert df.loc["sdlora", "forgetting_mean"] == pytest.approx(statistics.fmean(fgt))
    assert df.loc["sdlora", "bwt_mean"] == pytest.approx(-statistics.fmean(fgt))
    # costs: params mean over tasks / at the last task, total train seconds
    assert df.loc["sdlora", "trainable_params_mean"] == pytest.approx(700)
    assert df.loc["sdlora", "trainable_params_last"] == pytest.approx(900)
    assert df.loc["sdlora", "train_seconds"] == pytest.approx(60.0)
    assert df.loc["l2p", "forward_passes_per_image"] == 1


def test_bold_marks_best_per_column(abc_report):
    path, df = abc_report
    assert bool(df.loc["sdlora", "final_acc_best"])
    assert not df.loc[["l2p", "inflora", "dualprompt"], "final_acc_best"].any()
    # lower is better for forgetting: A forgets least (C a bit more, B and D much more)
    assert df["forgetting_mean"].idxmin() == "sdlora"
    assert bool(df.loc["sdlora", "forgetting_best"])
    assert df["forgetting_best"].sum() == 1

    md = (path / "summary.md").read_text()
    a = f"{df.loc['sdlora', 'final_acc_mean']:.2f} ± {df.loc['sdlora', 'final_acc_std']:.2f}"
    b = f"{df.loc['l2p', 'final_acc_mean']:.2f} ± {df.loc['l2p', 'final_acc_std']:.2f}"
    assert f"**{a}**" in md
    assert b in md and f"**{b}" not in md
    tex = (path / "summary.tex").read_text()
    assert "\\textbf{" + a.replace(" ± ", " $\\pm$ ") + "}" in tex
    assert "\\textbf{" + b.replace(" ± ", " $\\pm$ ") not in tex
    # the fewest trainable parameters (sdlora: 700 against 2,000, in thousands) is bold
    rows = md_rows(md)
    assert rows["sdlora"]["Trainable params, mean over tasks (K)"] == "**0.700**"
    assert rows["l2p"]["Trainable params, mean over tasks (K)"] == "2"


def test_significance_marks_only_where_due(abc_report):
    path, df = abc_report
    # B is worse than A on every shared seed: significant
    assert df.loc["l2p", "final_acc_p_vs_best"] < 0.05
    assert bool(df.loc["l2p", "final_acc_sig"])
    # C is nearly equal to A: not significant
    assert df.loc["inflora", "final_acc_p_vs_best"] > 0.05
    assert not df.loc["inflora", "final_acc_sig"]
    # D has one seed: never tested; the best method is not tested against itself
    assert math.isnan(df.loc["dualprompt", "final_acc_p_vs_best"])
    assert not df.loc["dualprompt", "final_acc_sig"]
    assert math.isnan(df.loc["sdlora", "final_acc_p_vs_best"])

    md_rows = {line.split("|")[1].strip(): line for line in
               (path / "summary.md").read_text().splitlines() if line.startswith("| ")}
    final_col = 3  # | Method | Seeds | Final acc | ...
    assert md_rows["l2p"].split("|")[final_col].strip().endswith("†")
    for name in ("sdlora", "inflora", "dualprompt"):
        assert "†" not in md_rows[name].split("|")[final_col]
    md = (path / "summary.md").read_text()
    assert "ttest_rel" in md and "paired t-test" in md
    tex = (path / "summary.tex").read_text()
    assert "$^{\\dagger}$" in tex and "ttest" in tex


def test_csv_round_trips(abc_report, tmp_path):
    path, df = abc_report
    root = abc_runs(tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("error", report.ReportWarning)
        frame = report.summary_frame(report.group_runs(report.load_runs([root])),
                                     report.DEFAULT_METRICS).set_index("row")
    assert sorted(frame.index) == sorted(df.index)
    for col in frame.columns:
        if col in ("group", "split_protocol", "split_hash", "benchmark", "method", "seeds",
                   "reference", "precision"):
            def text(values):
                return ["" if pd.isna(v) else str(v) for v in values]

            assert text(frame.loc[df.index, col]) == text(df[col]), col
            continue
        ours = pd.to_numeric(frame.loc[df.index, col]).astype(float).to_numpy()
        back = pd.to_numeric(df[col]).astype(float).to_numpy()
        assert ((abs(ours - back) < 1e-9) | (pd.isna(ours) & pd.isna(back))).all(), col
    assert pd.api.types.is_float_dtype(df["final_acc_mean"])
    assert pd.api.types.is_float_dtype(df["final_acc_std"])
    assert pd.api.types.is_integer_dtype(df["n_seeds"])


def test_figures_written(abc_report):
    from PIL import Image

    path, df = abc_report
    names = ["acc_curve.png", "forgetting.png"] + [f"acc_matrix_{m}.png" for m in df.index]
    for name in names:
        file = path / name
        assert file.stat().st_size > 5000, name
        with Image.open(file) as img:
            assert img.format == "PNG"
            assert img.width >= 600 and img.height >= 450, (name, img.size)
            assert round(img.info["dpi"][0]) >= 150
    svg = (path / "acc_curve.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "number of tasks learned" in svg  # axis label present


def test_per_task_forgetting_matches_metric():
    acc = [[80.0], [90.0, 94.0], [70.0, 88.0, 93.0]]  # task 1 improves after task 2 (backward)
    per_task = M.per_task_forgetting(acc)
    assert per_task == [90.0 - 70.0, 94.0 - 88.0]  # max over i in [j, T-2], not acc[j][j]
    correct = [[round(a * 2) for a in row] for row in acc]
    total = [[200] * len(row) for row in acc]
    assert statistics.fmean(per_task) == pytest.approx(M.forgetting(correct, total))


def test_metrics_recomputed_from_counts_not_file(tmp_path):
    # unequal test sets: pooled accuracy differs from the task mean; stored numbers are wrong
    acc = [[100.0], [50.0, 100.0]]
    write_results(tmp_path / "runs", "sdlora", 0, acc, totals=[100, 300],
                  stored_metrics={"final_acc": 1.0, "avg_inc_acc": 1.0})
    with pytest.warns(report.ReportWarning, match="recomputed"):
        out = report.write_report([tmp_path / "runs"], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv")
    assert df.loc[0, "final_acc_mean"] == pytest.approx(100 * (50 + 300) / 400)


# ---------------------------------------------------------------------------------------------
# safety: incompatible and incomplete runs
# ---------------------------------------------------------------------------------------------

def test_different_split_hash_warns_and_separates(tmp_path, real_figures):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0 + seed), split_hash="hash-a")
        write_results(root, "l2p", seed, mat3(60.0 + seed), split_hash="hash-b")
    with pytest.warns(report.ReportWarning, match="different data splits"):
        out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv")
    assert df["group"].nunique() == 2
    assert set(df.groupby("group")["split_hash"].nunique()) == {1}
    assert not df["final_acc_sig"].any()  # nothing compared across the splits
    md = (out / "summary.md").read_text()
    assert "**Warning:**" in md and "different data splits" in md
    # one matrix per group and method
    assert len(list(out.glob("acc_matrix_*.png"))) == 2


def test_same_split_compatible_runs_do_not_warn(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0 + seed))
        write_results(root, "l2p", seed, mat3(60.0 + seed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = report.write_report([root], out_dir=tmp_path / "rep")
    assert pd.read_csv(out / "summary.csv")["group"].nunique() == 1
    assert "Warning" not in (out / "summary.md").read_text()


def test_different_class_order_same_seed_warns(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0), class_order=[0, 1, 2, 3, 4, 5])
    write_results(root, "l2p", 0, mat3(60.0), class_order=[5, 4, 3, 2, 1, 0])
    with pytest.warns(report.ReportWarning, match="different class orders"):
        out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv")
    assert df["group"].nunique() == 2
    assert "different class orders" in (out / "summary.md").read_text()


def test_partial_run_is_not_averaged(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    write_results(root, "sdlora", 1, mat3(87.0))
    # killed after 2 of 3 tasks, with numbers that would move the mean a lot
    write_results(root, "sdlora", 2, [[20.0], [10.0, 20.0]], n_tasks=3, complete=False)
    out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv")
    assert len(df) == 1
    assert df.loc[0, "n_seeds"] == 2
    assert df.loc[0, "seeds"] == "0 1"
    expected = statistics.fmean([final_mean(mat3(85.0)), final_mean(mat3(87.0))])
    assert df.loc[0, "final_acc_mean"] == pytest.approx(expected)
    inc = pd.read_csv(out / "incomplete_runs.csv")
    assert list(inc["seed"]) == [2] and list(inc["tasks_done"]) == [2]
    assert list(inc["status"]) == ["incomplete"]
    assert inc.loc[0, "acc_after_last_done_task"] == pytest.approx(15.0)
    md = (out / "summary.md").read_text()
    assert "## Runs left out" in md and "seed-2" in md


def test_run_marked_complete_but_short_is_incomplete(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    write_results(root, "sdlora", 1, [[20.0]], n_tasks=3, complete=True)
    with pytest.warns(report.ReportWarning, match="treated as incomplete"):
        out = report.write_report([root], out_dir=tmp_path / "rep")
    assert pd.read_csv(out / "summary.csv").loc[0, "n_seeds"] == 1
    assert len(pd.read_csv(out / "incomplete_runs.csv")) == 1


def test_hparam_variants_are_separate_rows(tmp_path):
    root = tmp_path / "runs"
    write_results(root / "a", "sdlora", 0, mat3(85.0), hparams={"lr": 0.01})
    write_results(root / "b", "sdlora", 0, mat3(70.0), hparams={"lr": 0.1})
    out = report.write_report([root], out_dir=tmp_path / "rep")
    rows = sorted(pd.read_csv(out / "summary.csv")["row"])
    assert rows == ["sdlora [lr=0.01]", "sdlora [lr=0.1]"]


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

def test_metric_selection_and_errors(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    out = report.write_report([root], out_dir=tmp_path / "rep", metrics=["final_acc,bwt"])
    cols = pd.read_csv(out / "summary.csv").columns
    assert "final_acc_mean" in cols and "bwt_mean" in cols and "avg_inc_acc_mean" not in cols
    with pytest.raises(UsageError, match="unknown metric"):
        report.write_report([root], out_dir=tmp_path / "rep2", metrics=["accuracy"])
    with pytest.raises(UsageError, match="no results.json"):
        report.write_report([tmp_path / "rep"], out_dir=tmp_path / "rep3")


def test_default_out_dir_and_name(tmp_path, monkeypatch):
    root = tmp_path / "my-sweep"
    write_results(root, "sdlora", 0, mat3(85.0))
    monkeypatch.chdir(tmp_path)
    out = report.write_report([root])
    assert out == Path("reports") / "my-sweep"
    assert (tmp_path / "reports" / "my-sweep" / "summary.md").read_text().startswith(
        "# Report: my-sweep")


def test_paper_numbers_file():
    from clbench.registry import METHODS

    paper = report.load_paper_numbers()
    sdlora = [e for e in paper if e.citation == "Wu et al., SD-LoRA, ICLR 2025"]
    assert {(e.benchmark, e.tasks) for e in sdlora} == {
        ("imagenet-r", 5), ("imagenet-r", 10), ("imagenet-r", 20), ("imagenet-a", 10),
        ("domainnet", 5), ("cifar100", 10), ("cub200", 10)}

    def one(method, benchmark, tasks):
        [entry] = [e for e in sdlora if (e.method, e.benchmark, e.tasks) == (method, benchmark, tasks)]
        return entry

    assert one("sdlora", "imagenet-r", 10).metric("final_acc") == (77.34, 0.35)
    assert one("inflora", "imagenet-a", 10).metric("avg_inc_acc") == (60.92, 0.61)
    assert one("sdlora-kd", "cub200", 10).metric("final_acc")[0] == 75.95
    assert "Table 3" in one("finetune", "domainnet", 5).source
    assert not [e for e in sdlora if (e.method, e.benchmark) == ("hide-prompt", "cifar100")]
    assert sum(e.benchmark == "domainnet" for e in sdlora) == 9
    assert one("sdlora", "imagenet-r", 10).own_paper and not one("l2p", "imagenet-r", 10).own_paper
    for e in paper:  # every figure names a registered method and a well-formed protocol
        assert e.method in METHODS.names(), e
        assert e.protocol.startswith("B") and "-Inc" in e.protocol, e
        assert e.benchmark != "imagenet-r" or e.split is not None, e  # two splits in use


def _entry(method, split, protocol, table, own=False, mean=70.0):
    from clbench.report.paper import Published

    return Published(method=method, benchmark="imagenet-r", tasks=10, protocol=protocol,
                     split=split, final_acc={"mean": mean, "se": None}, avg_inc_acc=None,
                     citation="Someone et al.", table=table, statistic="one run",
                     backbone="ViT-B/16", own_paper=own)


def test_a_published_figure_stands_only_beside_runs_of_its_protocol_and_split():
    """Split (ADAM/PILOT archive vs CODA's lists) and task protocol (B0-Inc20 vs a 5-class first
    task) must both agree; the method's own paper wins over another paper's re-run."""
    from clbench.report.paper import published_for, task_protocol

    assert task_protocol([20] * 10) == "B0-Inc20" and task_protocol([5] + [5] * 39) == "B0-Inc5"
    assert task_protocol([50] + [10] * 5) == "B50-Inc10"
    entries = [_entry("m", "coda", "B0-Inc20", "T1"), _entry("m", "sdlora", "B5-Inc5", "T2"),
               _entry("m", "sdlora", "B0-Inc20", "T3"), _entry("m", "sdlora", "B0-Inc20", "T4", own=True)]
    pick = lambda protocol, sizes: published_for(entries, "m", "imagenet-r", 10, sizes, protocol)  # noqa: E731
    assert pick("imagenet-r-sdlora-adam-presplit", [20] * 10).table == "T4"
    assert pick("imagenet-r-coda-prompt-lists", [20] * 10).table == "T1"
    assert pick("imagenet-r-coda-prompt-lists", [5] * 10) is None  # another task protocol
    assert pick("my-own-split", [20] * 10) is None
    assert published_for(entries, "other", "imagenet-r", 10, [20] * 10, "sdlora") is None
    assert published_for(entries, "m", "imagenet-r", 20, [20] * 10, "sdlora") is None
    own_split = [_entry("m", "slca", "B0-Inc20", "T5", own=True)]  # a paper's own split: never
    assert published_for(own_split, "m", "imagenet-r", 10, [20] * 10, "imagenet-r-sdlora-adam-presplit") is None


def test_compare_paper_leaves_a_run_on_the_other_split_without_a_figure(tmp_path):
    root = tmp_path / "runs"
    acc = [[90.0] * (i + 1) for i in range(10)]
    write_results(root / "pilot", "sdlora", 0, acc, protocol="imagenet-r-sdlora-adam-presplit",
                  classes_per_task=[20] * 10)
    write_results(root / "coda", "sdlora", 0, acc, protocol="imagenet-r-coda-prompt-lists",
                  split_hash="hash-b", classes_per_task=[20] * 10)
    out = report.write_report([root], out_dir=tmp_path / "rep", compare_paper=True)
    df = pd.read_csv(out / "summary.csv").set_index("split_protocol")
    assert df.loc["imagenet-r-sdlora-adam-presplit", "paper_final_acc"] == 77.34
    assert math.isnan(df.loc["imagenet-r-coda-prompt-lists", "paper_final_acc"])


def test_compare_paper_adds_columns(tmp_path):
    root = tmp_path / "runs"
    acc5 = [[90.0] * (i + 1) for i in range(5)]  # final 90, AAA 90
    write_results(root, "sdlora", 0, acc5, classes_per_task=[40] * 5)
    write_results(root, "mine", 0, acc5, classes_per_task=[40] * 5)
    out = report.write_report([root], out_dir=tmp_path / "rep", compare_paper=True)
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert df.loc["sdlora", "paper_final_acc"] == 79.15
    assert df.loc["sdlora", "delta_final_acc"] == pytest.approx(90.0 - 79.15)
    assert df.loc["sdlora", "delta_avg_inc_acc"] == pytest.approx(90.0 - 83.01)
    assert math.isnan(df.loc["mine", "paper_final_acc"])
    md = (out / "summary.md").read_text()
    assert "paper Acc (%)" in md and "Δ Acc" in md and "+10.85" in md and "Table 2" in md
    plain = report.write_report([root], out_dir=tmp_path / "plain")
    assert "paper Acc" not in (plain / "summary.md").read_text()


def test_every_table2_method_is_registered_and_compared(tmp_path):
    """All nine rows of the SD-LoRA paper's Table 2 are methods clbench can run, and an
    ImageNet-R 10-task report puts a published number beside each."""
    from clbench.registry import METHODS

    table2 = sorted(e.method for e in report.load_paper_numbers()
                    if e.table == "Table 2" and e.tasks == 10 and "SD-LoRA" in e.citation)
    assert len(table2) == 9 and set(table2) <= set(METHODS.names())
    root = tmp_path / "runs"
    for method in table2:
        write_results(root, method, 0, [[80.0] * (i + 1) for i in range(10)],
                      classes_per_task=[20] * 10)
    out = report.write_report([root], out_dir=tmp_path / "rep", compare_paper=True)
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert df.loc[table2, "paper_final_acc"].notna().all()


def test_import_is_light():
    code = ("import sys, clbench.report, clbench.tracking; "
            "heavy = [m for m in ('torch', 'wandb', 'matplotlib', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------------

SECRET = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.slow
def test_wandb_offline_writes_table_and_images(tmp_path, monkeypatch, real_figures):
    pytest.importorskip("wandb")
    wb = tmp_path / "wb"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wb))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # must never be written anywhere
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0 + seed))
        write_results(root, "l2p", seed, mat3(60.0 + seed))
    out = report.write_report([root], out_dir=tmp_path / "rep", wandb_mode="offline")
    runs = list((wb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    tables = list((media / "table").glob("*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert "final_acc_mean" in logged["columns"] and len(logged["data"]) == 2
    images = list((media / "images").glob("*.png"))
    assert len(images) == len(list(out.glob("*.png"))) == 4  # curve, forgetting, 2 matrices
    assert list(runs[0].glob("run-*.wandb"))
    for file in [*wb.rglob("*"), *out.rglob("*")]:
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_tracking_disabled_and_scrubbed(tmp_path):
    assert tracking.start_run("disabled", "p", "g", "n", {}, tmp_path) is None
    tracking.log_task(None, 0, {"acc": 1.0})
    tracking.finish(None)
    clean = tracking._scrub({"lr": 0.1, "wandb_api_key": "x", "nested": {"token": "y", "a": 1}})
    assert clean == {"lr": 0.1, "nested": {"a": 1}}
    with pytest.raises(UsageError, match="unknown W&B mode"):
        tracking.start_run("cloud", "p", "g", "n", {}, tmp_path)


def test_wandb_online_without_key_raises(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(UsageError, match="needs an API key: run `wandb login`"):
        tracking.start_run("online", "p", "g", "n", {}, tmp_path / "wb")
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    with pytest.raises(UsageError, match="--wandb offline"):
        report.write_report([root], out_dir=tmp_path / "rep", wandb_mode="online")
    assert not (tmp_path / "rep").exists()  # refused before writing anything
    assert not (tmp_path / "wb").exists()


def test_malformed_results_is_a_usage_error(tmp_path):
    bad = tmp_path / "runs" / "x" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"method": "sdlora", "seed": 0}))
    with pytest.warns(report.ReportWarning, match="skipped"), \
            pytest.raises(UsageError, match="missing benchmark, n_tasks, correct, total"):
        report.load_runs([tmp_path / "runs"])
    with pytest.raises(UsageError, match="not found"):
        report.load_runs([tmp_path / "nowhere"])


# ---------------------------------------------------------------------------------------------
# issue 12: diverged runs, reference methods, method info, figures, paths, bad files
# ---------------------------------------------------------------------------------------------

def test_diverged_run_is_listed_apart_and_never_ranked(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0 + seed), status="complete")
        write_results(root, "l2p", seed, mat3(60.0 + seed), status="complete")
    # NaN training: every row present, constant 10 % -> forgetting 0, BWT 0 ("best" if ranked)
    flat = [[10.0] * (i + 1) for i in range(3)]
    for seed in range(2):
        write_results(root, "finetune", seed, flat, status="diverged")
    out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert "finetune" not in df.index
    assert df["forgetting_best"].sum() == 1 and not bool(df.loc["l2p", "final_acc_best"])
    left = pd.read_csv(out / "incomplete_runs.csv")
    assert list(left["status"]) == ["diverged", "diverged"]
    assert list(left["tasks_done"]) == [3, 3]
    md = (out / "summary.md").read_text()
    assert "diverged run(s)" in md and "| diverged" in md


def joint_abc(root: Path) -> Path:
    abc_runs(root)
    for seed in range(3):  # the upper bound beats everyone, and is nearly constant
        write_results(root, "joint", seed, mat3(95.0 + seed * 0.5, mid=94.0, final_rest=(93.0,)))
    return root


def test_reference_upper_bound_shown_but_not_ranked(tmp_path):
    out = report.write_report([joint_abc(tmp_path / "runs")], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert df.loc["joint", "reference"] == "upper-bound"
    assert df["final_acc_mean"].idxmax() == "joint"
    assert not df.loc["joint", ["final_acc_best", "forgetting_best", "final_acc_sig"]].any()
    assert math.isnan(df.loc["joint", "final_acc_p_vs_best"])
    # best continual method is bold; the others are tested against it, not against joint
    assert bool(df.loc["sdlora", "final_acc_best"])
    assert df.loc["inflora", "final_acc_p_vs_best"] > 0.05  # against joint it would be < 0.05
    assert bool(df.loc["l2p", "final_acc_sig"])
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| joint (upper bound)"))
    assert "**" not in row and "†" not in row
    assert "reference points" in md


def test_reference_drawn_dashed_and_named_in_legend(tmp_path):
    from clbench.report.plots import method_colors, plot_acc_curves

    groups = report.group_runs(report.load_runs([joint_abc(tmp_path / "runs")])).groups
    labels = [r.label for r in groups[0].runs]
    fig = plot_acc_curves(groups, method_colors(labels), [tmp_path / "c.png"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "joint (upper bound)" in legend and "sdlora" in legend
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["joint"].get_linestyle() == "--"
    assert all(line.get_linestyle() != "--" for k, line in lines.items() if k != "joint")


def test_reference_read_from_config_before_the_name(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "oracle", seed, mat3(99.0), config_extra={"reference": "upper-bound"})
        write_results(root, "joint", seed, mat3(98.0), config_extra={"reference": None})
        write_results(root, "sdlora", seed, mat3(80.0 + seed))
    df = report.summary_frame(report.group_runs(report.load_runs([root])),
                              report.DEFAULT_METRICS).set_index("row")
    assert df.loc["oracle", "reference"] == "upper-bound" and not df.loc["oracle", "final_acc_best"]
    assert df.loc["joint", "reference"] == "" and bool(df.loc["joint", "final_acc_best"])


def test_method_info_table_shows_kd_absorptions(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        info = [{"mode": "kd", "rank": 10, "magnitudes": [1.0], "kd_absorbed": 0, "kd_fitted": 0},
                {"mode": "kd", "rank": 10, "magnitudes": [1.0, 1.0], "kd_absorbed": seed,
                 "kd_fitted": 24, "kd_residual_min": 0.31},
                {"mode": "kd", "rank": 10, "magnitudes": [1.0] * 3, "kd_absorbed": 2,
                 "kd_fitted": 24, "kd_residual_min": 0.35}]
        write_results(root, "sdlora-kd", seed, mat3(80.0 + seed), method_info=info)
        write_results(root, "l2p", seed, mat3(60.0))
    out = report.write_report([root], out_dir=tmp_path / "rep")
    info = pd.read_csv(out / "method_info.csv")
    absorbed = info[(info["row"] == "sdlora-kd") & (info["key"] == "kd_absorbed")]
    assert list(absorbed["value"]) == [0.0, 0.5, 2.0]
    assert set(info["key"]) == {"rank", "kd_absorbed", "kd_fitted", "kd_residual_min"}
    md = (out / "summary.md").read_text()
    assert "### Method info" in md
    info_md = md.split("### Method info")[1]
    table = [[c.strip() for c in line.strip("|").split("|")] for line in info_md.splitlines()
             if line.startswith("| sdlora-kd ") or line.startswith("| Method ")]
    assert table[0] == ["Method", "Info", "all tasks", "task 1", "task 2", "task 3"]
    rows = {cells[1]: cells[2:] for cells in table[1:]}
    assert rows["kd_absorbed"] == ["", "0", "0.5", "2"]  # changes: one cell per task
    assert rows["rank"] == ["10", "", "", ""]  # the same after every task: shown once
    assert rows["kd_residual_min"] == ["", "", "0.31", "0.35"]  # not fitted at task 1: blank
    assert "| mode" not in md and "| magnitudes" not in md  # not numbers: CSV/JSON only


def _lab(color):
    from matplotlib.colors import to_rgb

    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in to_rgb(color)]
    x = (0.4124 * lin[0] + 0.3576 * lin[1] + 0.1805 * lin[2]) / 0.95047
    y = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    z = (0.0193 * lin[0] + 0.1192 * lin[1] + 0.9505 * lin[2]) / 1.08883
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in (x, y, z)]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def test_twenty_methods_get_clearly_different_colours():
    from itertools import combinations

    from clbench.report.plots import method_colors

    colors = method_colors(f"method-{k:02d}" for k in range(20))
    labs = [_lab(c) for c in colors.values()]
    assert len(set(colors.values())) == 20
    closest = min(math.dist(a, b) for a, b in combinations(labs, 2))
    assert closest > 25, closest  # tab20's dark/light pairs are ~17 apart
    assert all(lab[0] < 85 for lab in labs)  # none too light to see on white


def _groups(root: Path, n_tasks: int, seeds=(0,)):
    for seed in seeds:
        for method in ("a", "b"):
            acc = [[90.0 - 2 * (i - j) - (method == "b") for j in range(i + 1)]
                   for i in range(n_tasks)]
            write_results(root, method, seed, acc)
    return report.group_runs(report.load_runs([root])).groups


@pytest.mark.parametrize("n_tasks", [2, 12])
def test_forgetting_plot_ticks_every_task_as_integer(tmp_path, n_tasks):
    from clbench.report.plots import method_colors, plot_forgetting

    groups = _groups(tmp_path / "runs", n_tasks)
    fig = plot_forgetting(groups, method_colors(["a", "b"]), tmp_path / "f.png")
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == list(range(1, n_tasks))


def test_one_seed_reports_no_spread(tmp_path, real_figures):
    from clbench.report.plots import method_colors, plot_acc_curves

    root = tmp_path / "runs"
    groups = _groups(root, 3)
    fig = plot_acc_curves(groups, method_colors(["a", "b"]), [tmp_path / "c.png"])
    assert "±" not in fig._suptitle.get_text() and "one seed" in fig._suptitle.get_text()
    out = report.write_report([root], out_dir=tmp_path / "rep")
    md = (out / "summary.md").read_text()
    assert "±" not in md and "One seed per method" in md
    several = _groups(tmp_path / "runs2", 3, seeds=(0, 1))
    fig = plot_acc_curves(several, method_colors(["a", "b"]), [tmp_path / "c2.png"])
    assert "mean ± std" in fig._suptitle.get_text()


def test_no_machine_paths_in_report(tmp_path):
    root = tmp_path / "deep" / "my-run"
    write_results(root, "sdlora", 0, mat3(85.0))
    write_results(root, "sdlora", 1, [[20.0]], n_tasks=3)  # incomplete: listed with its file
    out = report.write_report([root.resolve()], out_dir=tmp_path / "rep")
    for file in out.iterdir():
        if file.suffix in (".md", ".csv", ".tex"):
            text = file.read_text()
            assert str(tmp_path) not in text and "/deep/" not in text, file.name
    md = (out / "summary.md").read_text()
    assert "found under: `my-run`" in md
    assert "my-run/imagenet-r-3tasks/sdlora/seed-1/results.json" in md


def test_rereport_removes_stale_figures_only(tmp_path, real_figures):
    root = tmp_path / "runs"
    write_results(root / "one", "sdlora", 0, mat3(85.0))
    write_results(root / "two", "l2p", 0, mat3(60.0))
    out = tmp_path / "rep"
    report.write_report([root], out_dir=out)
    assert (out / "acc_matrix_l2p.png").exists()
    (out / "notes.txt").write_text("mine")
    report.write_report([root / "one"], out_dir=out)
    assert not (out / "acc_matrix_l2p.png").exists()
    assert (out / "acc_matrix_sdlora.png").exists() and (out / "notes.txt").exists()


def test_corrupt_results_is_skipped_with_one_warning(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0 + seed))
    bad = write_results(root, "l2p", 0, mat3(60.0)) / "results.json"
    bad.write_text(bad.read_text()[:40])  # truncated by a crash or a full disk
    with pytest.warns(report.ReportWarning, match=r"skipped cannot read .*l2p/seed-0/results.json"):
        out = report.write_report([root], out_dir=tmp_path / "rep")
    assert list(pd.read_csv(out / "summary.csv")["row"]) == ["sdlora"]
    md = (out / "summary.md").read_text()
    warning = [line for line in md.splitlines() if "l2p/seed-0/results.json" in line]
    assert len(warning) == 1 and warning[0].startswith("- **Warning:** skipped cannot read")


def test_unwritable_output_is_one_line_usage_error(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="cannot write the report to") as err:
        report.write_report([root], out_dir=blocker / "rep")
    assert "\n" not in str(err.value)
    import os
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UsageError, match="cannot write the report"):
            report.write_report([root], out_dir=locked)


def test_precision_and_gflops_columns(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_results(root, "sdlora", seed, mat3(85.0), precision="bf16", gflops=17.56)
        write_results(root, "l2p", seed, mat3(60.0), precision="bf16", gflops=None)
    out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert df.loc["sdlora", "gflops_per_image"] == pytest.approx(17.56)
    assert math.isnan(df.loc["l2p", "gflops_per_image"])
    assert set(df["precision"]) == {"bf16"}
    md = (out / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert "precision: bf16;" in md and "Precision" not in cols
    assert cols.index("GFLOPs / test image") == cols.index("Forward passes / test image") + 1
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| sdlora") or line.startswith("| l2p")}
    gcol = cols.index("GFLOPs / test image")
    assert rows["sdlora"][gcol] == "17.6"  # the only measured value: nothing to rank
    assert rows["l2p"][gcol] == ""


def test_mixed_precision_shown_per_row_and_split(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0), precision="bf16")
    write_results(root, "sdlora", 1, mat3(86.0), precision="fp32")
    write_results(root, "l2p", 0, mat3(60.0), precision="fp32")
    out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv")
    assert sorted(df["row"]) == ["l2p", "sdlora [precision=bf16]", "sdlora [precision=fp32]"]
    md = (out / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert "Precision" in [c.strip() for c in header.strip("|").split("|")]
    assert "precision: " not in md


def test_wandb_online_unreachable_is_one_line_error(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    seen = {}

    def fail(**kwargs):
        seen.update(kwargs)
        raise wandb.errors.CommError("Run initialization has timed out after 20.0 sec.")

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setattr(wandb, "init", fail)
    with pytest.raises(UsageError, match="use --wandb offline") as err:
        tracking.start_run("online", "p", "g", "n", {}, tmp_path)
    assert "\n" not in str(err.value) and "timeout 20 s" in str(err.value)
    assert seen["settings"].init_timeout == tracking.ONLINE_TIMEOUT_S < 90


def test_results_with_wrong_types_is_skipped_not_a_traceback(tmp_path):
    root = tmp_path / "runs"
    write_results(root, "sdlora", 0, mat3(85.0))
    bad = write_results(root, "l2p", 0, mat3(60.0)) / "results.json"
    data = json.loads(bad.read_text())
    data["split"] = None
    data["seconds_per_task"] = [3.0, 4.0, 5.0]
    bad.write_text(json.dumps(data))
    with pytest.warns(report.ReportWarning, match="l2p/seed-0/results.json: not a clbench"):
        runs = report.load_runs([root])
    assert [r.method for r in runs] == ["sdlora"]


# ---------------------------------------------------------------------------------------------
# issue 20: tables and figures pasteable into a paper
# ---------------------------------------------------------------------------------------------

COST_HEADERS = ["Params, mean/task (K)", "Params, last task (K)", "Fwd passes / img",
                "FLOPs / img", "Train time (s)"]


def test_latex_has_an_accuracy_table_and_a_cost_table(abc_report):
    path, df = abc_report
    tables = tex_tables((path / "summary.tex").read_text())
    assert len(tables) == 2
    acc, cost = tables
    assert acc["label"].endswith("-acc") and acc["caption"].endswith(": accuracy")
    assert cost["label"].endswith("-cost") and cost["caption"].endswith(": cost")
    assert acc["header"] == ["Method", "Seeds", r"Final acc (\%) $\uparrow$",
                             r"Avg.\ inc.\ acc (\%) $\uparrow$",
                             r"Forgetting (\%) $\downarrow$", r"BWT (\%) $\uparrow$"]
    assert cost["header"] == ["Method", *COST_HEADERS]
    assert acc["spec"] == cost["spec"] == "lrrrrr"  # 6 columns each, not 11 in one
    assert [len(r) for r in acc["rows"] + cost["rows"]] == [6] * 8
    sdlora = next(r for r in cost["rows"] if r[0] == "sdlora")
    assert sdlora[1:] == [r"\textbf{0.700}", r"\textbf{0.900}", "1", "", "60"]
    assert "ttest" in acc["note"] and "Params" not in acc["note"]
    assert "hardware" in cost["note"] and "ttest" not in cost["note"]
    # the Markdown table stays complete: accuracy and cost columns side by side
    row = md_rows((path / "summary.md").read_text())["sdlora"]
    assert list(row)[:6] == ["Method", "Seeds", "Final acc (%) ↑", "Avg. inc. acc (%) ↑",
                             "Forgetting (%) ↓", "BWT (%) ↑"]
    assert list(row)[6:] == ["Trainable params, mean over tasks (K)",
                             "Trainable params, last task (K)", "Forward passes / test image",
                             "FLOPs / test image", "Train time, total (s)"]


def test_cost_units_are_chosen_per_column(tmp_path):
    from clbench.report.cells import GFLOPS, PARAMS, pick_unit, sig

    root = tmp_path / "runs"
    for seed in range(2):  # digits-sized models: a linear probe has 582 parameters on average
        write_results(root, "linear-probe", seed, mat3(60.0 + seed), params=[194, 582, 970],
                      gflops=0.0152, train_s=4000.0)
        write_results(root, "sdlora", seed, mat3(80.0 + seed), params=[15900] * 3,
                      gflops=0.0304, train_s=1000.0)
    out = report.write_report([root], out_dir=tmp_path / "rep")
    rows = md_rows((out / "summary.md").read_text())
    assert rows["linear-probe"]["Trainable params, mean over tasks (K)"] == "**0.582**"
    assert rows["sdlora"]["Trainable params, mean over tasks (K)"] == "15.9"
    assert rows["linear-probe"]["Trainable params, last task (K)"] == "**0.970**"
    assert rows["linear-probe"]["MFLOPs / test image"] == "**15.2**"
    assert rows["sdlora"]["Train time, total (min)"] == "50"  # 3 x 1,000 s
    assert rows["linear-probe"]["Train time, total (min)"] == "200"
    cost = tex_tables((out / "summary.tex").read_text())[1]
    assert cost["header"][1] == "Params, mean/task (K)" and cost["header"][4] == "MFLOPs / img"
    # the CSV keeps plain numbers in the stored units
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert df.loc["linear-probe", "trainable_params_mean"] == pytest.approx(582)
    # one unit per column, from its largest value; a few significant digits, no exponent
    assert pick_unit([86e6, 582], PARAMS) == (1e6, " (M)")
    assert pick_unit([999, 5], PARAMS) == (1.0, "")
    assert pick_unit([17.56], GFLOPS) == (1.0, "G")
    assert pick_unit([math.nan], PARAMS) == (1.0, "")
    assert [sig(x) for x in (0.000582, 455.0, 41.63, 6.2, 0.0)] == [
        "0.000582", "455", "41.6", "6.20", "0"]


def test_only_a_unique_best_is_bold(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        # a and b: the same results, the fewest parameters: tied best, so neither is bold
        for method in ("a", "b"):
            write_results(root, method, seed, mat3(85.0 + seed), params=[100] * 3, gflops=2.0)
        # c: clearly worse, the unique lowest FLOPs; d: FLOPs equal to c's as shown
        write_results(root, "c", seed, mat3(60.0 + seed, final_rest=(80.0,)), params=[500] * 3,
                      gflops=1.0001)
        write_results(root, "d", seed, mat3(50.0 + seed), params=[300] * 3, gflops=3.0)
    out = report.write_report([root], out_dir=tmp_path / "rep")
    df = pd.read_csv(out / "summary.csv").set_index("row")
    assert not df["final_acc_best"].any() and not df["forgetting_best"].any()
    # a tied best is still the yardstick of the t-test: c and d are worse than a on every seed
    assert bool(df.loc["c", "final_acc_sig"]) and bool(df.loc["d", "final_acc_sig"])
    assert math.isnan(df.loc["b", "final_acc_p_vs_best"])
    md = (out / "summary.md").read_text()
    rows = md_rows(md)
    for row in rows.values():
        assert "**" not in row["Final acc (%) ↑"] + row["Trainable params, last task"]
    assert rows["c"]["GFLOPs / test image"] == "**1.00**"
    tex = tex_tables((out / "summary.tex").read_text())
    assert not any("textbf" in cell for table in tex for r in table["rows"] for cell in r[:3])

    # two values that read the same are a tie, even if they differ further down
    write_results(root, "d", 0, mat3(50.0), params=[300] * 3, gflops=1.0004)
    for seed in (1, 2):
        write_results(root, "d", seed, mat3(50.0 + seed), params=[300] * 3, gflops=1.0004)
    rows = md_rows((report.write_report([root], out_dir=tmp_path / "rep2") / "summary.md")
                   .read_text())
    assert rows["c"]["GFLOPs / test image"] == rows["d"]["GFLOPs / test image"] == "1.00"


def test_train_time_is_never_bold_and_said_to_depend_on_hardware(abc_report):
    path, df = abc_report
    assert df["train_seconds"].idxmin() == "l2p"  # the fastest, 15 s
    rows = md_rows((path / "summary.md").read_text())
    assert rows["l2p"]["Train time, total (s)"] == "15"
    assert not any("**" in r["Train time, total (s)"] for r in rows.values())
    md = (path / "summary.md").read_text()
    assert "depends on the hardware each run used, so it is never bold" in md
    cost = tex_tables((path / "summary.tex").read_text())[1]
    assert [r[-1] for r in cost["rows"]] == ["30", "90", "15", "60"]  # no \textbf
    assert "depends on the hardware" in cost["note"]


def identical_pairs(root: Path) -> Path:
    """aper = simplecil and sdlora = sdlora-kd on every seed; sdlora-rr close but not equal."""
    for seed in range(2):
        for method in ("aper", "simplecil"):
            write_results(root, method, seed, mat3(88.0 + seed, mid=92.0))
        for method in ("sdlora", "sdlora-kd"):
            write_results(root, method, seed, mat3(65.0 + seed))
        write_results(root, "sdlora-rr", seed, mat3(65.5 + seed))
    return root


def test_identical_curves_are_named_in_the_figure_and_summary(tmp_path, real_figures):
    from clbench.report.plots import method_colors, plot_acc_curves
    from clbench.report.tables import identical_curves

    root = identical_pairs(tmp_path / "runs")
    groups = report.group_runs(report.load_runs([root])).groups
    assert identical_curves(groups[0]) == [["aper", "simplecil"], ["sdlora", "sdlora-kd"]]
    fig = plot_acc_curves(groups, method_colors(r.label for r in groups[0].runs),
                          [tmp_path / "c.png"])
    notes = [t.get_text().replace("\u00a0", " ") for t in fig.axes[0].texts]
    assert len(notes) == 1 and "identical curves" in notes[0]
    assert "aper = simplecil; sdlora = sdlora-kd" in notes[0].replace("\n", " ")
    assert "sdlora-rr" not in notes[0]
    out = report.write_report([root], out_dir=tmp_path / "rep")
    md = (out / "summary.md").read_text()
    note = next(line for line in md.splitlines() if "identical accuracy curves" in line)
    assert note.endswith(": aper = simplecil; sdlora = sdlora-kd.*")
    # nothing to say when no two curves coincide
    write_results(root, "simplecil", 0, mat3(87.0, mid=92.0))
    write_results(root, "sdlora-kd", 1, mat3(64.0))
    groups = report.group_runs(report.load_runs([root])).groups
    assert identical_curves(groups[0]) == []
    fig = plot_acc_curves(groups, method_colors(r.label for r in groups[0].runs),
                          [tmp_path / "c2.png"])
    assert not fig.axes[0].texts


def test_every_method_has_its_own_marker_and_line_style(tmp_path):
    from clbench.report.plots import method_colors, plot_acc_curves

    root = tmp_path / "runs"
    labels = [f"m{k:02d}" for k in range(20)]
    for k, method in enumerate(labels):
        write_results(root, method, 0, mat3(60.0 + k))
    groups = report.group_runs(report.load_runs([root])).groups
    fig = plot_acc_curves(groups, method_colors(labels), [tmp_path / "c.png"])
    lines = fig.axes[0].get_lines()
    assert len(lines) == 20
    pairs = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(pairs) == 20  # no two methods look alike even in grey print
    assert len({line.get_marker() for line in lines}) >= 10
    assert {line.get_linestyle() for line in lines} == {"-", "-.", ":"}  # "--": references
