"""Weights & Biases logging through the ``wandb`` package directly.

Avalanche's ``WandBLogger`` does not work with wandb 0.31 (``wandb.util.generate_id`` and
``wandb.viz`` are gone), so training and ``clbench report`` use these few functions instead.

Every function accepts the handle returned by :func:`start_run`, which is ``None`` when W&B is
disabled; then they do nothing. ``wandb`` is imported lazily so that importing this module (and
the CLI) stays fast.

Modes: ``disabled`` (nothing), ``offline`` (written under ``<dir>/wandb/offline-run-*``, no network,
no account; upload later with ``wandb sync``), ``online`` (needs an API key and the network: before
anything runs or is written, :func:`check_mode` asks the W&B server for any HTTP answer within
:data:`REACH_TIMEOUT_S` seconds, else one line suggests ``--wandb offline``; a run that still fails
to start is given :data:`ONLINE_TIMEOUT_S` seconds instead of wandb's 90, then one line too, and
the ``wandb/`` folder of that failed attempt is removed).
No API key or other secret is ever put in a run config: keys that look like secrets are dropped.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from clbench.errors import UsageError

MODES = ("disabled", "offline", "online")
ONLINE_TIMEOUT_S = 20
REACH_TIMEOUT_S = 10  # the whole reachability check, name resolution included

_NO_KEY = "W&B online mode needs an API key: run `wandb login` or use --wandb offline"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def check_mode(mode: str) -> str:
    """Validate ``mode``; for ``online`` also check that credentials exist and that the W&B
    server answers within :data:`REACH_TIMEOUT_S` seconds (called before any work starts)."""
    _check_credentials(mode)
    if mode == "online":
        check_reachable()
    return mode


def _check_credentials(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown W&B mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "online" and not _has_api_key():
        raise UsageError(_NO_KEY)


def _server() -> tuple[str, dict]:
    """The W&B server URL and proxies wandb itself will use: its system settings file
    (``wandb login --host``), then ``WANDB_*`` environment variables."""
    try:
        from wandb.sdk.wandb_settings import Settings

        settings = Settings()
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        settings.settings_system = str(Path(config_dir).expanduser() / "settings" if config_dir
                                       else Path("~/.config/wandb/settings").expanduser())
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        proxies = {k: v for k, v in (("http", settings.http_proxy),
                                     ("https", settings.https_proxy)) if v}
        return settings.base_url, proxies
    except Exception:  # noqa: BLE001 - another wandb version: the documented variable
        return os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai", {}


def _reason(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.exceptions.Timeout):
        return "no answer"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return errno.group(1).strip() if errno else type(exc).__name__


def check_reachable(timeout: float | None = None) -> None:
    """Any HTTP answer from the W&B server (the standard proxy variables apply) within
    ``timeout`` seconds, all of it, DNS included; else one line. Nothing is written."""
    import threading

    import requests

    timeout = REACH_TIMEOUT_S if timeout is None else timeout
    url, proxies = _server()
    outcome: dict = {}

    def probe():
        try:
            requests.get(url, timeout=(timeout, timeout), proxies=proxies or None,
                         allow_redirects=False).close()
            outcome["answered"] = True
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS, timeout
            outcome["error"] = exc

    thread = threading.Thread(target=probe, daemon=True, name="clbench-wandb-probe")
    thread.start()
    thread.join(timeout)
    if outcome.get("answered"):
        return
    reason = _reason(outcome["error"]) if "error" in outcome else "no answer"
    raise UsageError(f"W&B online: cannot reach {url} within {timeout:g} s ({reason}); check the "
                     "network (and WANDB_BASE_URL or a proxy), or use --wandb offline and "
                     "`wandb sync` the runs later")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        # Reads WANDB_API_KEY, the settings files and ~/.netrc (or $NETRC); never prompts and,
        # with verify=False, never contacts the server.
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # noqa: BLE001 - fall back to reading ~/.netrc ourselves
        return _netrc_has_wandb_entry()


def _netrc_has_wandb_entry() -> bool:
    import netrc

    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host or "coreweave" in host for host in hosts)


def _scrub(value: Any) -> Any:
    """Copy of ``value`` without secret-looking keys or the W&B API key itself."""
    api_key = os.environ.get("WANDB_API_KEY")
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if api_key and isinstance(value, str) and api_key in value:
        return "<redacted>"
    return value


def start_run(mode: str, project: str, group: str, name: str, config: dict, dir: Path):
    """Start a W&B run and return its handle, or ``None`` when ``mode == "disabled"``.

    Raises :class:`clbench.errors.UsageError` for an unknown mode, or for ``online`` without an
    API key (``WANDB_API_KEY``, ``wandb login`` / ~/.netrc) or when the run cannot start (the
    server is checked by :func:`check_mode` before any work starts, not again here).
    """
    _check_credentials(mode)
    if mode == "disabled":
        return None
    import wandb

    run_dir = Path(dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    own_folder = not (run_dir / "wandb").exists()
    try:
        return wandb.init(
            mode=mode,
            project=project,
            group=group,
            name=name,
            config=_scrub(config or {}),
            dir=str(run_dir),
            reinit="create_new",
            settings=wandb.Settings(console="off", init_timeout=ONLINE_TIMEOUT_S),
        )
    except Exception as exc:  # noqa: BLE001 - wandb raises several types (CommError, ...)
        if mode != "online":
            raise
        if own_folder:  # the failed attempt's logs: nothing of it is kept
            import shutil

            shutil.rmtree(run_dir / "wandb", ignore_errors=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"W&B online: could not start a run (timeout {ONLINE_TIMEOUT_S} s): "
                         f"{reason[:120]}; check the network and key, or use --wandb offline"
                         ) from None


def log_task(handle, task: int, metrics: dict) -> None:
    """Log the metrics measured after training task ``task`` (0-based), with ``task`` as step."""
    if handle is None:
        return
    handle.log({"task": task, **metrics}, step=task)


def log_report(handle, tables: Mapping[str, Any] | None = None,
               images: Mapping[str, Path] | None = None) -> None:
    """Log pandas DataFrames as ``wandb.Table`` and image files (PNG) as ``wandb.Image``."""
    if handle is None:
        return
    import wandb

    payload: dict[str, Any] = {}
    for key, frame in (tables or {}).items():
        payload[key] = wandb.Table(dataframe=frame.reset_index(drop=True))
    for key, path in (images or {}).items():
        payload[key] = wandb.Image(str(path))
    if payload:
        handle.log(payload)


def finish(handle) -> None:
    """Close the run (offline runs are then complete on disk and can be ``wandb sync``-ed)."""
    if handle is None:
        return
    handle.finish()


class NoTracking:
    def log(self, task, metrics):
        pass

    def finish(self):
        pass


class _WandbTracking:
    def __init__(self, handle):
        self.handle = handle

    def log(self, task, metrics):
        log_task(self.handle, task, metrics)

    def finish(self):
        finish(self.handle)


def start_tracking(plan, job, config: dict):
    """One W&B run per method × seed, grouped by the clbench run, streaming per-task metrics."""
    if plan.wandb == "disabled":
        return NoTracking()
    handle = start_run(plan.wandb, project="clbench", group=Path(plan.run_dir).name,
                                name=f"{job.method}-seed{job.seed}", config=config,
                                dir=job.out_dir)
    return _WandbTracking(handle) if handle is not None else NoTracking()
