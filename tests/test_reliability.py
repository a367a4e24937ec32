"""What a new user still hit (issue 20): an unwritable decoded cache, a killed cache build, W&B
online without a network, and the messages that must say what to do."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from clbench import decoded_cache, plan, tracking
from clbench.datasets import ImageFiles
from clbench.datasets import test_transform as eval_transform
from clbench.errors import UsageError
from fixtures_data import image_tree


def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------- decoded cache: writable

def test_unwritable_decoded_cache_is_refused_before_anything_runs(cli, tmp_path, tiny_checkpoint):
    """A data root under a regular file cannot hold ``.decoded`` (as root too, unlike chmod)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = cli("run", "--methods", "linear-probe", "--tasks", "2", "--epochs", "1",
                         "--decoded-cache", "--data-dir", blocker / "data", "--checkpoint",
                         tiny_checkpoint, "--out", tmp_path / "runs", "--name", "d", "--no-report")
    assert code == 2 and _one_line(err), err
    assert f"--decoded-cache: cannot write to {blocker / 'data' / '.decoded'}" in err
    assert "without --decoded-cache" in err
    assert out == "" and not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_read_only_data_folder_is_refused_unless_its_cache_is_built(tmp_path, monkeypatch):
    """A read-only file system (EROFS even for root): refused in one line, unless ``.decoded``
    already holds finished caches, which a shared read-only copy may serve."""
    folder = tmp_path / "data" / ".decoded"
    folder.mkdir(parents=True)

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(plan.tempfile, "mkstemp", read_only)
    with pytest.raises(UsageError) as info:
        plan.check_decoded_cache(folder)
    assert str(info.value) == (f"--decoded-cache: cannot write to {folder} (Read-only file "
                               "system); make the data folder writable, choose another "
                               "--data-dir, or run without --decoded-cache")
    (folder / "0123456789abcdef").mkdir()
    (folder / "0123456789abcdef" / "index.json").write_text("{}")
    plan.check_decoded_cache(folder)  # built before: readable as is


def test_build_that_cannot_write_is_one_line(tmp_path):
    names = image_tree(tmp_path / "imgs", ["a"], 2, 20, seed=1)
    files = ImageFiles(tmp_path / "imgs", names, [0, 0], eval_transform(16))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"--decoded-cache: cannot write to .*a-file/\.decoded"):
        decoded_cache.build(files, blocker / ".decoded", processes=1)


# ------------------------------------------------------------------- decoded cache: killed builds

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_build_is_removed_by_the_next_one_but_live_ones_are_kept(tmp_path):
    names = image_tree(tmp_path / "imgs", ["a", "b"], 2, 20, seed=2)
    files = ImageFiles(tmp_path / "imgs", names, [0, 0, 1, 1], eval_transform(16))
    cache = tmp_path / "cache"
    host = decoded_cache._HOST
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = _dead_pid()
        folders = {
            "dead": cache / f".partial-0123456789abcdef-{host}-{dead}",
            "dead, older name": cache / f".partial-fedcba9876543210-{dead}",
            "live": cache / f".partial-0123456789abcdef-{host}-{live.pid}",
            "other host": cache / f".partial-0123456789abcdef-elsewhere-{dead}",
        }
        for folder in folders.values():
            folder.mkdir(parents=True)
            (folder / "pixels.u8").write_bytes(b"\0" * 1024)
        built = decoded_cache.build(files, cache, processes=1)
        assert (built / "index.json").is_file()
        assert not folders["dead"].exists() and not folders["dead, older name"].exists()
        assert folders["live"].exists() and folders["other host"].exists()
    finally:
        live.kill()
        live.wait()


def test_resume_of_a_run_killed_before_training_says_to_rerun(cli, tmp_path):
    """A run killed while building the decoded cache leaves its (empty) folder and no run.json:
    --resume says that nothing was computed and the same command simply starts again."""
    (tmp_path / "killed").mkdir()
    code, _, err = cli("run", "--resume", tmp_path / "killed")
    assert code == 2 and _one_line(err)
    assert "nothing was computed; rerun the original command" in err
    assert "decoded-cache build is simply redone" in err


def test_interrupt_before_training_does_not_point_to_resume(cli, tmp_path, monkeypatch):
    from clbench import runner

    def interrupted(plan_, resuming=False):
        os.makedirs(plan_.run_dir)  # what run() has done before the cache build
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    code, _, err = cli("run", "--methods", "finetune", "--out", tmp_path, "--name", "i")
    assert code == 130
    assert "nothing was computed; rerun the same command" in err and "--resume" not in err


# ----------------------------------------------------------------------------- W&B without network

@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """A fake key and a W&B server on the loopback interface; nothing else is contacted."""
    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: closed
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                  "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.chdir(tmp_path)  # a wandb/ folder in the working directory would show


def test_wandb_online_without_network_is_one_line_and_leaves_nothing(
        cli, tmp_path, tiny_checkpoint, wandb_env):
    began = time.monotonic()
    code, out, err = cli("run", "--methods", "linear-probe", "--tasks", "2", "--epochs", "1",
                         "--checkpoint", tiny_checkpoint, "--out", tmp_path / "runs", "--name",
                         "w", "--wandb", "online", "--no-report")
    assert code == 2 and _one_line(err), err
    assert (f"W&B online: cannot reach http://127.0.0.1:9 within {tracking.REACH_TIMEOUT_S} s "
            "(Connection refused)") in err and "--wandb offline" in err
    assert out == "" and time.monotonic() - began < tracking.REACH_TIMEOUT_S
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("wandb"))


def test_wandb_server_that_never_answers_is_given_the_stated_time(wandb_env, monkeypatch):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(tracking, "REACH_TIMEOUT_S", 1)
        began = time.monotonic()
        with pytest.raises(UsageError, match=r"cannot reach http://127\.0\.0\.1:\d+ within 1 s "
                                             r"\(no answer\)"):
            tracking.check_mode("online")
        assert time.monotonic() - began < 5


def test_wandb_server_that_answers_passes(wandb_env, monkeypatch):
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:  # any HTTP answer (here 501) means the server is there
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert tracking.check_mode("online") == "online"
    finally:
        server.shutdown()
        server.server_close()


def test_failed_wandb_start_removes_its_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)

    def fail(dir, **kwargs):
        (tmp_path / "job" / "wandb" / "run-x" / "logs").mkdir(parents=True)
        raise wandb.errors.CommError("Run initialization has timed out after 20.0 sec.")

    monkeypatch.setattr(wandb, "init", fail)
    with pytest.raises(UsageError, match="use --wandb offline"):
        tracking.start_run("online", "p", "g", "n", {}, tmp_path / "job")
    assert (tmp_path / "job").is_dir() and not (tmp_path / "job" / "wandb").exists()
