"""Supervised child processes: a launcher (torchrun / deepspeed) whose whole process group stops with its parent.

`orca8k train` with several processes runs its launcher through `run_supervised`, so the ranks stop when the
command is cancelled — Ctrl-C, `dvc repro` interrupted, or a Prefect flow run cancelled (SIGTERM to the task's
process) — and when that process dies outright (SIGKILL, the OOM killer: `PR_SET_PDEATHSIG`). Linux semantics;
elsewhere only the signal handlers apply.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn (Linux): the child gets SIGTERM when the thread that started it dies; if the parent is already
    gone (it died between fork and prctl), the child stops at once."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork; only called in the child

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def terminate_group(proc: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM the child's process group, wait up to `grace_seconds` for the group to empty, then SIGKILL it."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def _group_alive(pgid: int) -> bool:
    """True while a non-zombie process of group `pgid` exists (zombies count as gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def run_supervised(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    grace_seconds: float = 30.0,
    capture_stdout: bool = False,
) -> subprocess.CompletedProcess:
    """Run `cmd` (e.g. a torchrun/deepspeed launcher) as a supervised child and wait for it.

    - The child leads a new session/process group (`start_new_session`), so its workers share one group id.
    - On Linux it gets `PR_SET_PDEATHSIG` = SIGTERM: it is stopped when this process dies, even by SIGKILL (a
      launcher stops its own workers on SIGTERM).
    - SIGTERM or SIGINT to this process (Prefect's cancellation, Ctrl-C) terminates the whole group (SIGTERM, then
      SIGKILL after `grace_seconds`), then goes on to the handler that was installed before (Prefect's), or raises
      `SystemExit(128 + signum)` / `KeyboardInterrupt`. Handlers are installed from the main thread only (Python's
      rule); elsewhere the death signal and the `finally` below still stop the group.

    Returns:
        The completed process (`stdout` set when `capture_stdout`; stderr always goes to this process's stderr).

    Raises:
        subprocess.CalledProcessError: the child exited with a non-zero status (`returncode`, `cmd`, `output`).
    """
    preexec = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec,
                            stdout=subprocess.PIPE if capture_stdout else None, text=True)
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        terminate_group(proc, grace_seconds)
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        out, _ = proc.communicate()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if proc.poll() is None:  # left by an exception (or a handler that returned): stop the group
            terminate_group(proc, grace_seconds)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(cmd), output=out)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout=out)
