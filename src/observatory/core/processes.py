"""Running the heavy steps of a service (a conversion, a calibration solve) in a process of their own.

A native library that aborts its process (casacore's C++ ``terminate`` on an I/O error,
a Rust panic in mwalib on a damaged file, the OOM killer) then fails that one step, not
the server or Dask worker running every other job. And a process of its own runs its
code in a main thread, where it may fork worker processes: AOFlagger's binding holds
the GIL, so threads of a Dask worker flag on one core.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Set for a command started by :func:`run_command`: the process that waits for it, with
#: which the command dies (:func:`die_with_parent`).
PARENT_PID_VARIABLE = "OBSERVATORY_PARENT_PID"
#: Set for a command started by :func:`run_command`: the memory its caller's task may use
#: (a Dask worker's share), which the command keeps to (:func:`memory_limit_bytes`).
MEMORY_LIMIT_VARIABLE = "OBSERVATORY_MEMORY_LIMIT_BYTES"
#: ... and the CPUs its caller's task may use (:func:`cpu_share`).
CPU_SHARE_VARIABLE = "OBSERVATORY_CPU_SHARE"
#: How often a running command's caller is asked whether to stop it (``poll``).
POLL_INTERVAL_S = 1.0
#: How long a stopped command has to clean up after SIGTERM before it is killed.
STOP_GRACE_S = 30.0

#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


class CommandFailed(Exception):
    """A command run by :func:`run_command` failed; the message says how, in its words."""


def run_command(
    command: Sequence[str], *, cwd: Path, what: str, poll: Callable[[], None] = lambda: None
) -> str:
    """Run ``command`` (an ``observatory`` subcommand) to its end; returns what it printed.

    Parameters
    ----------
    command
        The program and its arguments.
    cwd
        Its working directory (its stderr is written there, as ``<what>.stderr``).
    what
        What it does, for the messages (``conversion``: "the conversion failed ...").
    poll
        Called every ``POLL_INTERVAL_S`` while it runs; an exception from it (a job
        cancelled) stops the command (SIGTERM, then SIGKILL after ``STOP_GRACE_S``) and
        goes on up.

    Raises
    ------
    CommandFailed
        If it exits with a non-zero status (the message is its one-line ``error: ...``, or
        the last line it printed) or dies of a signal.
    """
    # Its stderr goes to a file, not a pipe: a command that prints much and is not read
    # would block on a full pipe.
    with open(cwd / f"{what.replace(' ', '-')}.stderr", "w+b") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, cwd=cwd,
            env={
                **os.environ,
                PARENT_PID_VARIABLE: str(os.getpid()),  # it dies with us
                # Its memory and CPUs are this task's share: a Dask worker's memory monitor
                # does not see a child's, and the worker's other tasks need theirs.
                MEMORY_LIMIT_VARIABLE: str(memory_limit_bytes()),
                CPU_SHARE_VARIABLE: str(cpu_share()),
            },
        )  # fmt: skip
        try:
            while True:
                try:
                    stdout, _ = process.communicate(timeout=POLL_INTERVAL_S)
                    break
                except subprocess.TimeoutExpired:
                    poll()
        except BaseException:
            _stop(process)
            raise
        stderr.seek(0)
        message = _last_error_line(stderr.read().decode(errors="replace"))
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        raise CommandFailed(
            f"the {what} process died of {name}"
            + (f" ({message})" if message else " (a crash in a native library, or out of memory)")
        )
    if process.returncode != 0:
        raise CommandFailed(message or f"the {what} failed (exit status {process.returncode})")
    return stdout.decode()


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the command removes its partial output), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _last_error_line(stderr: str) -> str:
    """The command's one-line error (``error: ...``), else the last line it printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1] if lines else ""


class WorkerClosing(Exception):
    """The Dask worker running this task is closing (its server stops): the task stops too."""


def stop_if_worker_closing() -> None:
    """Raise :class:`WorkerClosing` in a task of a Dask worker that is closing, else nothing.

    A ``poll`` for :func:`run_command`: a server that stops would otherwise wait for a
    command running in its in-process worker's thread (a calibrator's solve: minutes),
    and a worker told to stop would be killed with it running.
    """
    worker = _dask_worker()
    if worker is None:
        return
    from distributed.core import Status

    if worker.status in (Status.closing, Status.closing_gracefully, Status.closed):
        raise WorkerClosing(f"the Dask worker running this task is {worker.status.name}")


def _dask_worker() -> Any:
    """The Dask worker whose task this thread runs, or None."""
    # Without distributed imported, no Dask worker runs in this process (and importing it
    # would cost a conversion's or solve's process half a second).
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:  # not in a worker's task
        return None


def memory_limit_bytes() -> int:
    """The memory one task of this process may use.

    The least of the machine's memory, its cgroup's limit, inside a Dask worker the
    worker's ``memory_limit`` shared by the tasks its threads run at once, and in a
    command started by :func:`run_command` what its caller's task had.
    """
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for cgroup_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):  # absent, or "max": no cgroup limit
            limits.append(int(Path(cgroup_file).read_text().strip()))
    with contextlib.suppress(KeyError, ValueError):  # not started by run_command
        limits.append(int(os.environ[MEMORY_LIMIT_VARIABLE]))
    worker = _dask_worker()
    if worker is not None and worker.memory_manager.memory_limit:
        limits.append(int(worker.memory_manager.memory_limit) // max(1, worker.state.nthreads))
    return min(limits)


def cpu_share() -> int:
    """The CPUs one task of this process may keep busy (at least 1).

    The CPUs this process may run on, inside a Dask worker shared by the tasks its
    threads run at once, and in a command started by :func:`run_command` what its
    caller's task had: a worker of 8 threads on 8 CPUs running 8 conversions had each
    fork 8 workers.
    """
    shares = [
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ]
    with contextlib.suppress(KeyError, ValueError):  # not started by run_command
        shares.append(int(os.environ[CPU_SHARE_VARIABLE]))
    worker = _dask_worker()
    if worker is not None:
        shares.append(shares[0] // max(1, worker.state.nthreads))
    return max(1, min(shares))


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux only).

    Without it a process outlives a parent killed outright (``kill -9``, the OOM killer):
    a worker holding its memory, asleep on the pipe to the parent forever, or an ASVO
    job's conversion running on for a job its killed Dask worker will run again. The
    kernel sends the signal when the *thread* that forked this process ends: a pool's
    workers are forked by the thread that submits their work, a command's (main) thread,
    and a command by the worker thread that waits for it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError):  # no C library or no prctl: nothing to set
        return
    if os.getppid() != parent_pid:
        # The parent died before the signal was set: nothing would send it now.
        os.kill(os.getpid(), signum)


def die_with_starter(signum: int = signal.SIGKILL) -> None:
    """:func:`die_with_parent` for a command started by :func:`run_command` (else nothing)."""
    if parent := os.environ.get(PARENT_PID_VARIABLE):
        die_with_parent(int(parent), signum)


def forking_is_safe() -> bool:
    """Whether this process may fork worker processes: from a program's main thread, while
    no other thread runs.

    Inside a service (a Dask worker thread, a daemonic worker process), or beside any
    other thread (a notebook kernel's, a caller's background thread), forking is not
    safe: another thread may hold a lock the child would inherit taken, and wait for it
    there forever (CPython warns of this from 3.12 on).
    """
    return (
        not multiprocessing.current_process().daemon
        and threading.current_thread() is threading.main_thread()
        and threading.active_count() == 1
    )
