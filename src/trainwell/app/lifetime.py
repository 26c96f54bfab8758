"""Process lifetime: no orphans. Children die with their parent; signals reach the children.

Rule: every process trainwell starts (ablation and ensemble pool workers, the torchrun
agent, the DDP ranks) dies when the process that started it dies, however that one
died (SIGKILL and the OOM killer included), and a signal sent to a launcher (SIGTERM,
SIGINT, SIGHUP) is forwarded to what it launched.

* ``die_with_parent()`` — on Linux, ``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends
  ``sig`` to this process when its parent dies. The parent may already be dead when
  it is called (it runs after the child's imports), so it then checks the parent at
  once and sends itself ``sig`` when the parent is gone. Elsewhere a daemon thread
  polls the parent every second (``os.getppid()`` changes when a POSIX parent dies;
  a ``multiprocessing`` child watches its parent's sentinel) and does the same.
* ``forward_signals(proc)`` — while the block runs, SIGTERM / SIGINT / SIGHUP sent to
  this process go to the child (its whole process group when it was started with
  ``start_new_session=True``); a second signal sends SIGKILL.
* ``python -m trainwell.app.lifetime [--parent-pid PID] MODULE ARGS...`` runs ``python
  -m MODULE ARGS...`` in a process that dies with its parent; ``launch()`` runs the
  torchrun agent this way.

Linux caveats: the death signal fires when the parent *thread* that started the child
exits, not only the parent process, so start children from a thread that outlives them
(the main thread, or the thread that owns the pool's ``with`` block). It is not
inherited by the children of a fork: every generation asks for its own. A stopped
process (SIGSTOP) keeps a SIGTERM pending until it is continued; only SIGKILL ends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WRAPPER = "trainwell.app.lifetime"  # python -m WRAPPER MODULE ...: see main()
AGENT_PID_ENV = "TRAINWELL_AGENT_PID"  # set by the wrapper for the processes it starts
GRACE_S = 5.0  # after sending itself the signal, how long before a hard os._exit
DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False where there is no such call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _liveness(parent_pid: int | None) -> Callable[[], bool]:
    """A check that is True while the parent lives.

    ``parent_pid`` given: the parent is alive while ``os.getppid()`` still equals it
    (an orphan is re-parented to init or a subreaper, so there is no pid-reuse trap).
    Otherwise a ``multiprocessing`` child watches its parent's sentinel, and any other
    process compares ``os.getppid()`` with its value now.
    """
    if parent_pid is not None:
        return lambda: os.getppid() == parent_pid
    parent = multiprocessing.parent_process()
    if parent is not None:
        return parent.is_alive
    ppid = os.getppid()
    return lambda: os.getppid() == ppid


def _die(sig: int) -> None:
    """Send ``sig`` to this process; exit hard (status ``128 + sig``) if it is still alive."""
    os.kill(os.getpid(), sig)
    time.sleep(GRACE_S)  # a handler may be shutting down cleanly
    os._exit(128 + int(sig))


def _watch(alive: Callable[[], bool], sig: int, interval_s: float) -> None:
    """Start a daemon thread that polls ``alive`` and dies with ``sig`` once it is False."""

    def run() -> None:
        while alive():
            time.sleep(interval_s)
        _die(sig)

    threading.Thread(target=run, name="trainwell-parent-watch", daemon=True).start()


def die_with_parent(
    sig: int = signal.SIGTERM,
    *,
    parent_pid: int | None = None,
    method: str = "auto",
    interval_s: float = 1.0,
) -> str:
    """Make this process receive ``sig`` when its parent dies; the method used.

    Rule: Linux asks the kernel (``prctl(PR_SET_PDEATHSIG, sig)``) and then checks the
    parent once, since it may have died before the call; other platforms (or
    ``method="poll"``) start a daemon thread that checks the parent every
    ``interval_s`` seconds. A dead parent makes this process send itself ``sig`` (so
    its handler, if any, runs), then ``os._exit(128 + sig)`` after 5 s if still alive.

    Pass ``parent_pid`` (the pid of the process that started this one, e.g. given on
    its command line) to close the window between this process's start and the call;
    without it a ``multiprocessing`` child watches its parent's sentinel and any other
    process trusts its parent of now. Caveat (Linux): the signal fires when the parent
    *thread* that started this process exits. On Windows a parent's pid never changes,
    so only ``multiprocessing`` children (which watch a handle) are really watched.

    Args:
        sig: the signal to receive, SIGTERM by default (a handler can save and exit).
        parent_pid: the parent's pid as the parent saw itself; None to infer it.
        method: ``"auto"`` (PDEATHSIG where available, else poll), ``"pdeathsig"``
            or ``"poll"``.
        interval_s: seconds between two checks of the poll.

    Returns:
        ``"pdeathsig"`` or ``"poll"``.

    Example:
        >>> import subprocess, sys
        >>> code = "from trainwell.app.lifetime import die_with_parent as d; print(d())"
        >>> out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        >>> out.stdout.strip() in {"pdeathsig", "poll"}
        True
    """
    if method not in ("auto", "pdeathsig", "poll"):
        raise ValueError(f"method must be 'auto', 'pdeathsig' or 'poll', got {method!r}")
    if not interval_s > 0:
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
    alive = _liveness(parent_pid)
    used = "pdeathsig" if method != "poll" and _set_pdeathsig(sig) else "poll"
    if method == "pdeathsig" and used == "poll":
        raise ValueError("method='pdeathsig' needs Linux prctl(PR_SET_PDEATHSIG); use 'auto'")
    if not alive():  # the parent died before the kernel was told
        _die(sig)
    if used == "poll":
        _watch(alive, sig, interval_s)
    return used


def worker_init(threads: int | None = 1) -> None:
    """``ProcessPoolExecutor(initializer=worker_init)``: the worker dies with its owner.

    A pool worker waits on a queue that its own copy of the pipe keeps open, so an
    owner killed with SIGKILL leaves it idle forever; this makes it die with the owner
    (``die_with_parent``) and sets its torch threads (``None`` leaves them).
    """
    die_with_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _own_group(proc: subprocess.Popen) -> bool:
    """True when ``proc`` leads its own process group (``start_new_session=True``)."""
    if not hasattr(os, "getpgid"):
        return False
    try:
        return os.getpgid(proc.pid) == proc.pid
    except (ProcessLookupError, PermissionError):
        return False


def _send(proc: subprocess.Popen, sig: int, group: bool) -> None:
    """``sig`` to ``proc`` (to its process group when ``group``); quiet once it is gone."""
    if proc.returncode is not None:  # reaped: its pid may belong to someone else now
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


@contextlib.contextmanager
def forward_signals(
    proc: subprocess.Popen, signals: Sequence[int] = DEFAULT_SIGNALS
) -> Iterator[list[int]]:
    """Forward ``signals`` received by this process to ``proc`` while the block runs.

    Rule: the first signal goes to the child as it is, to its whole process group when
    it leads one (``start_new_session=True``); a second one sends SIGKILL. The block
    gets the list of signals received; the old handlers come back on exit. Handlers can
    only be installed from the main thread: elsewhere nothing is forwarded.

    Example:
        >>> import os, signal, subprocess, sys
        >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
        ...                          start_new_session=True)
        >>> with forward_signals(child) as received:
        ...     os.kill(os.getpid(), signal.SIGTERM)  # to us; the child gets it
        ...     returncode = child.wait(timeout=30)
        >>> received == [signal.SIGTERM], returncode == -signal.SIGTERM
        (True, True)
    """
    received: list[int] = []
    group = _own_group(proc)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        _send(proc, signal.SIGKILL if len(received) > 1 else signum, group)

    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                previous[sig] = signal.signal(sig, forward)
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_status(returncode: int, received: Sequence[int] = ()) -> int:
    """A shell's exit status for a child: ``128 + signal`` when a signal ended it.

    A negative ``returncode`` (killed by that signal) gives ``128 + signal``; a failed
    child after a forwarded signal gives ``128 +`` the first signal received.

    Example:
        >>> exit_status(0), exit_status(3), exit_status(-15), exit_status(1, [2])
        (0, 3, 143, 130)
    """
    if returncode < 0:
        return 128 - returncode
    if returncode and received:
        return 128 + int(received[0])
    return returncode


def module_command(module: str, args: Sequence[str], parent_pid: int | None = None) -> list[str]:
    """``python -m MODULE ARGS`` in a process that dies with ``parent_pid`` (default: us).

    Example:
        >>> module_command("torch.distributed.run", ["--standalone"], parent_pid=7)[1:6]
        ['-m', 'trainwell.app.lifetime', '--parent-pid', '7', 'torch.distributed.run']
    """
    pid = os.getpid() if parent_pid is None else parent_pid
    return [sys.executable, "-m", WRAPPER, "--parent-pid", str(pid), module, *args]


def main(argv: Sequence[str]) -> None:
    """``python -m trainwell.app.lifetime [--parent-pid PID] MODULE ARGS...``.

    Dies with its parent, records its own pid in ``TRAINWELL_AGENT_PID`` for the
    processes the module starts (their parent), then runs the module as ``__main__``.
    """
    argv = list(argv)
    parent_pid = None
    if argv[:1] == ["--parent-pid"] and len(argv) > 1:
        parent_pid, argv = int(argv[1]), argv[2:]
    if not argv:
        raise SystemExit("usage: python -m trainwell.app.lifetime [--parent-pid PID] MODULE ...")
    die_with_parent(parent_pid=parent_pid)
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
