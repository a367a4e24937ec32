"""The CLI contract: end-to-end run on `digits`, results layout, resume, bad input → exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from clbench.metrics import summarize

from clbench.schema import RunResult

RESULT_KEYS = {f.name for f in __import__("dataclasses").fields(RunResult)}


def _results(run_dir, method, seed=1993, tasks=5):
    path = run_dir / f"digits-{tasks}tasks" / method / f"seed-{seed}" / "results.json"
    return json.loads(path.read_text())


def test_help_and_list_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from clbench.cli import main
        main(["list"])
        assert "torch" not in sys.modules and "avalanche" not in sys.modules, "heavy import"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "finetune" in out.stdout and "digits" in out.stdout and "vit-tiny-letters" in out.stdout
    assert "built-in" in out.stdout


@pytest.mark.slow
def test_run_end_to_end_on_digits(tmp_path, cli, tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("run", "--methods", "linear-probe,finetune", "--epochs", "1",
                         "--checkpoint", tiny_checkpoint, "--out", tmp_path, "--name", "e2e",
                         "--seeds", "1993,1994")
    assert code == 0, err
    run_dir = tmp_path / "e2e"
    for method in ("linear-probe", "finetune"):
        for seed in (1993, 1994):
            results = _results(run_dir, method, seed)
            assert RESULT_KEYS <= set(results)
            assert results["status"] == "complete" and results["n_tasks"] == 5
            assert results["precision"] == "fp32" and results["gflops_per_image"] > 0
            assert results["classes_per_task"] == [2] * 5
            assert [len(row) for row in results["correct"]] == [1, 2, 3, 4, 5]
            assert sum(results["total"][-1]) == 540  # 30 % of 1,797 digits
            assert all(0 < s["to_first_step"] < s["train"] for s in results["seconds_per_task"])
            assert results["metrics"] == pytest.approx(summarize(results["correct"], results["total"]))
            config = json.loads((run_dir / "digits-5tasks" / method / f"seed-{seed}" / "config.json").read_text())
            assert config["backbone"]["tag"] == "vit_tiny_patch16_224"
            assert len(config["backbone"]["weights_sha256"]) == 64
            assert config["class_order"] == results["class_order"]
            assert config["precision"] == "fp32" and config["torch_threads"] >= 1
    assert _results(run_dir, "finetune", 1993)["class_order"] != _results(run_dir, "finetune", 1994)["class_order"]
    # the frozen backbone trains only the head; full fine-tuning trains everything
    assert _results(run_dir, "linear-probe")["trainable_params"][0] == 96 * 2 + 2
    assert _results(run_dir, "finetune")["trainable_params"][0] > 400_000
    assert "task 5/5" in out and "report:" in out
    report = out.strip().splitlines()[-1].split("report: ")[1]
    assert report.startswith(str(run_dir / "report"))  # under the run's output, not ./reports
    assert "linear-probe" in open(report).read()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(tmp_path, cli, tiny_checkpoint, monkeypatch):
    args = ["run", "--methods", "finetune", "--epochs", "1", "--checkpoint", tiny_checkpoint,
            "--out", tmp_path, "--no-report"]
    assert cli(*args, "--name", "straight")[0] == 0

    from clbench import runner

    real_save = runner.save_checkpoint
    saves = []

    def save_then_die(path, checkpoint):
        real_save(path, checkpoint)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    code, _, err = cli(*args, "--name", "killed")
    assert code == 130 and "--resume" in err
    assert len(_results(tmp_path / "killed", "finetune")["correct"]) == 2
    monkeypatch.setattr(runner, "save_checkpoint", real_save)

    code, out, err = cli("run", "--resume", tmp_path / "killed", "--no-report")
    assert code == 0, err
    assert "resuming after task 2/5" in out
    straight, resumed = _results(tmp_path / "straight", "finetune"), _results(tmp_path / "killed", "finetune")
    assert resumed["correct"] == straight["correct"] and resumed["status"] == "complete"


@pytest.mark.slow
def test_plugin_file_registers_and_runs_a_new_method(tmp_path, cli, tiny_checkpoint):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(textwrap.dedent('''
        from clbench.registry import register_method
        from clbench.methods.reference.finetune import LinearProbe

        @register_method("head-only-plugin", "a linear probe defined outside clbench")
        class HeadOnly(LinearProbe):
            pass
    '''))
    code, out, _ = cli("list", "--plugin", plugin)
    assert code == 0 and "head-only-plugin" in out and f"plugin file {plugin}" in out
    code, out, err = cli("run", "--plugin", plugin, "--methods", "head-only-plugin", "--epochs", "1",
                         "--tasks", "2", "--checkpoint", tiny_checkpoint, "--out", tmp_path,
                         "--name", "plug", "--no-report")
    assert code == 0, err
    assert _results(tmp_path / "plug", "head-only-plugin", tasks=2)["status"] == "complete"


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    from clbench import registry

    package = tmp_path / "site"
    (package / "ep_plugin_pkg").mkdir(parents=True)
    (package / "ep_plugin_pkg" / "__init__.py").write_text(textwrap.dedent('''
        from clbench.registry import register_method
        from clbench.methods.reference.finetune import LinearProbe

        @register_method("entry-point-probe", "installed through an entry point")
        class EntryPointProbe(LinearProbe):
            pass
    '''))
    dist = package / "ep_plugin_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[clbench.methods]\nentry-point-probe = ep_plugin_pkg\n")
    registry.METHODS.discover()  # built-ins register in the real registry, whatever the test order
    monkeypatch.syspath_prepend(str(package))
    fresh = registry.Registry("method", "clbench.methods")
    monkeypatch.setattr(registry, "METHODS", fresh)
    monkeypatch.setattr(registry, "register_method", fresh.register)
    assert "entry-point-probe" in [e.name for e in registry.static_entries(fresh)]
    assert fresh.get("entry-point-probe").__name__ == "EntryPointProbe"
    assert fresh._entries["entry-point-probe"].origin.startswith("entry point")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "sdlroa"], "unknown method 'sdlroa'"),
    (["--methods", "finetun"], "Did you mean 'finetune'"),
    (["--bench", "imagenett"], "unknown benchmark 'imagenett'"),
    (["--set", "finetune.rank=8"], "unknown hyperparameter 'rank' for finetune"),
    (["--set", "finetune.epochs=two"], "expects int"),
    (["--set", "nosuchkey=1"], "no method or benchmark in this run"),
    (["--set", "justtext"], "--set expects key=value"),
    (["--tasks", "3"], "valid choices: 2, 5"),
    (["--checkpoint", "/nonexistent/weights.safetensors"], "not found"),
    (["--epochs", "0"], "--epochs 0"), (["--epochs", "-1"], "--epochs -1"),
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-4"], "--batch-size -4"),
    (["--workers", "-1"], "--workers -1"), (["--lr", "-1"], "--lr -1"), (["--lr", "nan"], "--lr nan"),
    (["--seeds=-1"], "non-negative"), (["--seeds", " , "], "at least one value"),
    (["--tasks", "0"], "positive integer"), (["--tasks", "-1"], "positive integer"),
    (["--tasks", "10"], "identically 0"),
    (["--tasks", "1"], "--tasks 1 puts all 10 classes of digits in one task, which is not class-incremental"),
    (["--set", "finetune.lr=abc"], "expects float"),
    (["--precision", "fp8"], "invalid choice"),
    (["--name", "a/b"], "plain folder name"),
    (["--seeds", "1993,1993"], "--seeds 1993,1993: 1993 given more than once; give each once"),
    (["--methods", "finetune,linear-probe,finetune"], "finetune given more than once"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, cli, tmp_path):
    code, out, err = cli("run", "--methods", "finetune", "--out", tmp_path, *argv)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("results.json"))


@pytest.mark.parametrize("method_options, message", [
    (["--methods", "finetune,l2p-pp", "--set", "l2p-pp.prompt_blocks=[20]"], "prompt_blocks"),
    (["--methods", "finetune,sdlora", "--set", "sdlora.mode=fast"], "mode"),
    (["--methods", "finetune,sdlora", "--set", "sdlora.ranks=[0]"], "ranks"),
    (["--methods", "finetune,sdlora", "--set", "sdlora.first_task_lr=abc"], "expects float"),
])
def test_method_option_errors_come_before_any_training(method_options, message, cli, tmp_path):
    """Every job's options are checked first: finetune never starts when l2p-pp's are wrong."""
    code, out, err = cli("run", "--out", tmp_path, "--name", "bad", *method_options)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "task 1/" not in out and not list(tmp_path.rglob("results.json"))


def test_resume_of_a_missing_run_is_one_line(cli, tmp_path):
    code, _, err = cli("run", "--resume", tmp_path / "nonexistent")
    assert code == 2 and "no run.json there" in err and len(err.strip().splitlines()) == 1


def test_unreadable_checkpoint_is_a_clear_error(cli, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    code, _, err = cli("run", "--methods", "finetune", "--checkpoint", broken, "--out", tmp_path)
    assert code == 2 and "cannot load checkpoint" in err and len(err.strip().splitlines()) == 1


class NotATensor:
    pass


@pytest.mark.parametrize("kind", ["text", "pickled objects"])
def test_checkpoint_that_is_not_a_state_dict_says_what_is_expected(kind, cli, tmp_path):
    """Never torch's "retry with weights_only=False": clbench has no such option."""
    import torch

    path = tmp_path / "weights.pth"
    if kind == "text":
        path.write_text("these are my notes, not weights\n")
    else:
        torch.save({"model": NotATensor()}, path)
    code, _, err = cli("run", "--methods", "finetune", "--checkpoint", path, "--out", tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot load checkpoint {path}" in err and "weights_only" not in err
    assert "expected the backbone's weights as a .safetensors file, or a .pth/.bin state dict" in err


def test_checkpoint_of_another_model_is_refused_not_loaded_as_random_weights(cli, tmp_path):
    """timm loads a file non-strictly once the classifier is dropped: a state dict of some other
    model used to leave every backbone weight at its random initialisation, and the run went on."""
    import torch

    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, path)
    code, out, err = cli("run", "--methods", "linear-probe", "--tasks", "2", "--epochs", "1",
                         "--checkpoint", path, "--out", tmp_path, "--no-report")
    assert code == 2, err
    assert (f"checkpoint {path} does not hold the weights of vit_tiny_patch16_224 (54 of 54 "
            "tensors missing, e.g. cls_token)") in err and "Traceback" not in err
    assert "task 1/" not in out and not list(tmp_path.rglob("results.json"))


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_a_single_process(tmp_path, cli, tiny_checkpoint):
    """torchrun with 2 CPU processes (gloo): same global batches, gradients averaged over ranks
    weighted by slice size, evaluation gathered — the same accuracies as one process up to
    reduction order. Batch size 7 makes every batch split 4/3 (unequal shards), and the test
    sets (odd sizes) shard unequally too."""
    common = ["--methods", "finetune", "--epochs", "1", "--tasks", "2", "--batch-size", "7",
              "--checkpoint", tiny_checkpoint, "--out", tmp_path, "--no-report", "--device", "cpu"]
    assert cli("run", *common, "--name", "single")[0] == 0
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "clbench", "run", *map(str, common), "--name", "ddp",
                           "--ddp", "--nproc", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "× 2 processes" in done.stdout
    single = _results(tmp_path / "single", "finetune", tasks=2)
    ddp = _results(tmp_path / "ddp", "finetune", tasks=2)
    assert ddp["total"] == single["total"]  # the gathered evaluation saw every test image once
    for row_single, row_ddp in zip(single["correct"], ddp["correct"]):
        for a, b in zip(row_single, row_ddp):
            assert abs(a - b) <= 1  # floating-point reduction order may flip a borderline sample


def test_offline_without_cached_weights_fails_fast_with_advice(tmp_path, monkeypatch):
    from clbench.backbones import load_backbone
    from clbench.errors import UsageError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError) as error:
        load_backbone("vit-b16-in21k-ft-in1k")
    message = str(error.value)
    assert "vit_base_patch16_224.augreg2_in21k_ft_in1k" in message and "--checkpoint" in message
    # a plugin benchmark without default_backbone lands here: name the embedded backbone too
    assert "--backbone vit-tiny-letters" in message


@pytest.mark.slow
def test_run_streams_per_task_metrics_to_wandb_offline(tmp_path, cli, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_API_KEY", "")
    code, _, err = cli("run", "--methods", "linear-probe", "--epochs", "1", "--tasks", "2",
                       "--checkpoint", tiny_checkpoint, "--out", tmp_path, "--name", "wb",
                       "--wandb", "offline", "--no-report")
    assert code == 0, err
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline W&B run directory was written"
    assert any(f.suffix == ".wandb" for run in runs for f in run.iterdir())
