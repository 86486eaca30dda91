"""One harness for running ``gemserve serve`` as a process in a benchmark or a system test:
start it (its own session, killed with this script), wait for ``/ready``, sample it from
``/proc``, read its ``/metrics`` with prometheus_client's parser, stop it by pid (SIGINT, then
SIGTERM, then SIGKILL) and say how that went. bench/soak.py, bench/batching.py and
bench/replicas.py use it; in-process servers use ``server.app.serve_in_background`` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import REPO_ROOT

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    # As server.app.serve_in_background does: the kernel picks a free port; the short race until the
    # server binds it is acceptable on a test machine.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_command(port: int, *flags: str, host: str = HOST) -> list[str]:
    """``gemserve serve`` on ``host:port`` with ``flags``; never the API key (it would show in ``ps``)."""
    return [sys.executable, "-m", "cli", "serve", "--host", host, "--port", str(port), *flags]


def checkout_environment(api_key: str | None = None, **extra: str) -> dict[str, str]:
    """The server's environment: PYTHONPATH puts this checkout's packages ahead of whatever the venv
    has installed (an editable install may point at another worktree); the key travels here."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, **extra}
    env.pop("GEMSERVE_API_KEY_FILE", None)  # the server refuses a key and a key file together
    if api_key is not None:
        env["GEMSERVE_API_KEY"] = api_key
    return env


def die_with_parent() -> None:
    """preexec_fn: have Linux SIGTERM the server if this script dies without cleaning up (kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start_server(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only this script, which then stops
            # the load first and the server after, instead of the server shutting down under load.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float, log_path: Path) -> float:
    """Poll ``/ready`` until 200; returns the seconds it took. The first run converts the model (~60 s)."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before /ready:\n{log_tail(log_path)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the server was not ready within {timeout_s:g} s:\n{log_tail(log_path)}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen[bytes], grace_s: float) -> dict[str, Any]:
    """SIGINT (uvicorn finishes what it admitted), then SIGTERM, then SIGKILL; says how it went."""
    if proc.poll() is not None:
        return {"exit_code": proc.returncode, "stopped_by": None, "shutdown_s": 0.0}
    started = time.monotonic()
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0)):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            logger.warning("the server did not exit within %g s of %s", wait_s, sig.name)
            continue
        return {
            "exit_code": proc.returncode,
            "stopped_by": sig.name,
            "shutdown_s": round(time.monotonic() - started, 2),
        }
    proc.kill()
    proc.wait()
    return {"exit_code": proc.returncode, "stopped_by": "SIGKILL", "shutdown_s": round(time.monotonic() - started, 2)}


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    ready_s: float
    stopped: dict[str, Any] | None = None  # how it stopped (stop_server's report), once it has


@contextlib.contextmanager
def served(
    flags: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    ready_timeout_s: float = 600.0,
    grace_s: float = 30.0,
) -> Iterator[ServerProcess]:
    """``gemserve serve`` with ``flags`` on a free port (``prefix``: e.g. ``taskset -c 1``), ready
    when yielded, stopped on exit."""
    port = free_port()
    proc = start_server([*(prefix or []), *serve_command(port, *flags)], env or checkout_environment(), log_path)
    url = f"http://{HOST}:{port}"
    server = ServerProcess(proc, url, log_path, ready_s=0.0)
    try:
        server.ready_s = wait_until_ready(proc, url, ready_timeout_s, log_path)
        yield server
    finally:
        server.stopped = stop_server(proc, grace_s)


# ---- process sampling (no psutil: /proc is enough on Linux) ------------------------------------
def process_status(pid: int) -> dict[str, int | None]:
    """RSS in bytes and the thread count from /proc/<pid>/status; None once the process is gone."""
    status: dict[str, int | None] = {"rss_bytes": None, "threads": None}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return status
    for line in lines:
        name, _, value = line.partition(":")
        if name == "VmRSS":
            status["rss_bytes"] = int(value.split()[0]) * 1024  # the kernel reports kB
        elif name == "Threads":
            status["threads"] = int(value)
    return status


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ---- /metrics ---------------------------------------------------------------------------------
def metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """Each named sample (``gemserve_requests_total``, a gauge's name) summed over its label sets,
    parsed by prometheus_client; None when the server exports none."""
    values: dict[str, float | None] = dict.fromkeys(names)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] = (values[sample.name] or 0.0) + sample.value
    return values
