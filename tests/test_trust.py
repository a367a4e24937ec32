"""No silently wrong result: divergence, reused names, resume from anywhere, plugin clashes,
methods that change their backbone, inconsistent files on resume, unwritable output."""
from __future__ import annotations

import json
import os
import stat
import textwrap

import pytest

from clbench.schema import RunResult

pytestmark = pytest.mark.slow  # each test runs the CLI on digits (1 epoch, 2 tasks)


def _job(run_dir, method, seed=1993, tasks=2):
    return run_dir / f"digits-{tasks}tasks" / method / f"seed-{seed}"


def _results(run_dir, method, **kw) -> dict:
    return json.loads((_job(run_dir, method, **kw) / "results.json").read_text())


@pytest.fixture
def quick(tiny_checkpoint, tmp_path):
    return ["--epochs", "1", "--tasks", "2", "--checkpoint", str(tiny_checkpoint),
            "--out", str(tmp_path), "--no-report"]


def test_diverged_training_is_recorded_as_diverged_not_complete(cli, quick, tmp_path):
    code, out, err = cli("run", "--methods", "finetune,linear-probe", "--lr", "1e6", "--name", "big",
                         *quick)
    assert code == 1 and "diverged" in err
    result = RunResult.read(_job(tmp_path / "big", "finetune") / "results.json")
    assert result.status == "diverged" and not result.complete and "non-finite" in result.message
    assert "DIVERGED" in out
    # a re-run with the same settings does not silently retrain it into a "complete" result
    code, out, _ = cli("run", "--methods", "finetune,linear-probe", "--lr", "1e6", "--name", "big",
                       *quick)
    assert "already diverged" in out


def test_reused_name_with_other_settings_is_refused_and_plan_kept(cli, quick, tmp_path):
    assert cli("run", "--methods", "linear-probe", "--name", "same", *quick)[0] == 0
    plan_before = (tmp_path / "same" / "run.json").read_text()
    code, _, err = cli("run", "--methods", "linear-probe", "--name", "same", *quick, "--lr", "0.05")
    assert code == 2 and "other settings" in err and "lr" in err
    code, _, err = cli("run", "--methods", "linear-probe", "--name", "same", *quick,
                       "--backbone", "vit-tiny-letterz")
    assert code == 2
    assert (tmp_path / "same" / "run.json").read_text() == plan_before


def test_job_folder_with_other_hyperparameters_is_refused(cli, quick, tmp_path):
    """Also without run.json (sweeps share folders): config.json guards each job."""
    assert cli("run", "--methods", "linear-probe", "--name", "j", *quick)[0] == 0
    (tmp_path / "j" / "run.json").unlink()
    code, _, err = cli("run", "--methods", "linear-probe", "--name", "j", *quick, "--lr", "0.5")
    assert code == 2 and "other settings" in err


def _kill_after(monkeypatch, n_saves):
    from clbench import runner

    real_save, saves = runner.save_checkpoint, []

    def save_then_die(path, checkpoint):
        real_save(path, checkpoint)
        saves.append(path)
        if len(saves) == n_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(runner, "save_checkpoint", real_save)


def test_resume_from_another_directory_and_flags_with_resume(cli, tiny_checkpoint, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(work)
    restore = _kill_after(monkeypatch, 1)
    args = ["run", "--methods", "finetune", "--epochs", "1", "--tasks", "2", "--checkpoint",
            tiny_checkpoint, "--out", "runs", "--name", "rel", "--no-report"]
    assert cli(*args)[0] == 130
    restore()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli("run", "--resume", work / "runs" / "rel", "--epochs", "5")
    assert code == 2 and "--epochs" in err
    stored = json.loads((work / "runs" / "rel" / "run.json").read_text())
    assert stored["precision"] == "fp32" and stored["checkpoint"] == str(tiny_checkpoint.resolve())
    # the worker count changes no number (per-sample augmentation seeds): it may change on resume
    code, out, err = cli("run", "--resume", work / "runs" / "rel", "--workers", "2", "--no-report")
    assert code == 0, err
    assert "resuming after task 1/2" in out and not (elsewhere / "runs").exists()
    assert _results(work / "runs" / "rel", "finetune")["status"] == "complete"


def test_plugin_taking_a_builtin_name_is_refused(cli, quick, tmp_path):
    plugin = tmp_path / "clash.py"
    plugin.write_text(textwrap.dedent('''
        from clbench.registry import register_method
        from clbench.methods.reference.finetune import LinearProbe

        @register_method("sdlora", "not SD-LoRA at all")
        class Impostor(LinearProbe):
            pass
    '''))
    for argv in (["list", "--plugin", plugin], ["run", "--plugin", plugin, "--methods", "sdlora", *quick]):
        code, _, err = cli(*argv)
        assert code == 2 and "sdlora" in err and "already registered" in err and str(plugin) in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("source, message", [
    ("def broken(:\n", "syntax"),
    ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
    ("from clbench.registry import register_method\n@register_method('Bad_Name')\nclass X: pass\n",
     "lower-case"),
])
def test_broken_plugins_are_one_line(cli, quick, tmp_path, source, message):
    plugin = tmp_path / "broken.py"
    plugin.write_text(source)
    code, _, err = cli("run", "--plugin", plugin, "--methods", "finetune", *quick)
    assert code == 2 and message.lower() in err.lower() and len(err.strip().splitlines()) == 1
    code, _, err = cli("list", "--plugin", tmp_path / "missing.py")
    assert code == 2 and "not found" in err


def test_method_that_changes_its_backbone_resumes_identically(cli, quick, tmp_path, monkeypatch):
    """A plugin written from the README that trains the backbone (no special attribute): the
    checkpoint must carry the changed backbone so kill + resume equals an uninterrupted run."""
    plugin = tmp_path / "ewc_like.py"
    plugin.write_text(textwrap.dedent('''
        from clbench.registry import register_method
        from clbench.methods.reference.finetune import LinearProbe

        @register_method("backbone-trainer", "trains the backbone too")
        class BackboneTrainer(LinearProbe):
            def prepare_model(self, model):
                model.backbone.requires_grad_(True)
    '''))
    args = ["run", "--plugin", plugin, "--methods", "backbone-trainer", *quick]
    assert cli(*args, "--name", "straight")[0] == 0
    restore = _kill_after(monkeypatch, 1)
    assert cli(*args, "--name", "killed")[0] == 130
    restore()
    assert cli("run", "--resume", tmp_path / "killed", "--no-report")[0] == 0
    straight = _results(tmp_path / "straight", "backbone-trainer")
    assert _results(tmp_path / "killed", "backbone-trainer")["correct"] == straight["correct"]


def test_resume_over_inconsistent_files_is_refused(cli, quick, tmp_path, monkeypatch):
    restore = _kill_after(monkeypatch, 1)
    assert cli("run", "--methods", "linear-probe", "--name", "k", *quick)[0] == 130
    restore()
    job = _job(tmp_path / "k", "linear-probe")
    results = json.loads((job / "results.json").read_text())
    good = dict(results)
    results.update(correct=[], total=[], trainable_params=[], seconds_per_task=[], method_info=[])
    (job / "results.json").write_text(json.dumps(results))  # fewer rows than the checkpoint
    code, _, err = cli("run", "--resume", tmp_path / "k", "--no-report")
    assert code == 2 and "rows" in err and str(job) in err
    (job / "results.json").write_text(json.dumps(good)[:50])  # truncated
    code, _, err = cli("run", "--resume", tmp_path / "k", "--no-report")
    assert code == 2 and "results.json" in err and "truncated" in err
    (job / "results.json").write_text(json.dumps(good))
    (job / "checkpoint.pt").write_bytes((job / "checkpoint.pt").read_bytes()[:100])
    code, _, err = cli("run", "--resume", tmp_path / "k", "--no-report")
    assert code == 2 and "checkpoint.pt" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_is_one_line(cli, quick, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = cli("run", "--methods", "linear-probe", *quick, "--out", blocker, "--name", "x")
    assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_files_honour_umask_record_threads_and_leftovers_are_removed(cli, quick, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli("run", "--methods", "linear-probe", "--name", "u", *quick)[0] == 0
    finally:
        os.umask(old)
    job = _job(tmp_path / "u", "linear-probe")
    assert stat.S_IMODE((job / "results.json").stat().st_mode) == 0o644
    assert json.loads((job / "config.json").read_text())["torch_threads"] >= 1
    leftover = job / ".tmp-checkpoint.pt.abc123"
    leftover.write_bytes(b"half a checkpoint")
    (job / "results.json").write_text((job / "results.json").read_text().replace(
        '"status": "complete"', '"status": "running"'))
    cli("run", "--resume", tmp_path / "u", "--no-report")
    assert not leftover.exists()


def test_sweep_slurm_without_slurm_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    code, _, err = cli("sweep", "--methods", "finetune", "--launcher", "slurm", "--out", tmp_path,
                       "--name", "s")
    assert code == 2 and "sbatch" in err and not (tmp_path / "s" / "sweep.json").exists()


def test_the_worker_count_changes_no_number_on_augmented_images(cli, tmp_path):
    """A JPEG benchmark with random crops and flips: 0 and 2 loader workers, the same counts."""
    import torch

    from clbench.perf import jpeg_tree

    jpeg_tree.generate(tmp_path / "data", jpeg_tree.TreeSpec(
        classes=4, train_per_class=10, test_per_class=4, side=40), processes=1)
    counts, checkpoints = [], []
    for workers in (0, 2):
        code, _, err = cli(
            "run", "--plugin", "clbench.perf.synthetic_bench", "--bench", "imagenet-r-synthetic",
            "--data-dir", tmp_path / "data", "--tasks", "2", "--methods", "finetune", "--epochs", "2",
            "--batch-size", "8", "--backbone", "vit-tiny-letters", "--workers", workers,
            "--out", tmp_path / "runs", "--name", f"w{workers}", "--no-report")
        assert code == 0, err
        [path] = (tmp_path / "runs" / f"w{workers}").rglob("results.json")
        result = json.loads(path.read_text())
        counts.append((result["correct"], result["total"]))
        checkpoints.append(torch.load(path.parent / "checkpoint.pt", weights_only=True))
    assert counts[0] == counts[1]
    # the trained weights too, bit for bit: every crop was the same
    first, second = (c["model"] for c in checkpoints)
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert checkpoints[0]["state"] == checkpoints[1]["state"]
