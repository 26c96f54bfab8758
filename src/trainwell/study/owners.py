"""Who holds a claimed run: an owner name per claiming process, and whether it is gone.

An owner is ``"host:pid:token"``. The host includes the PID namespace, so two containers
with one hostname never look like one machine. An owner on this machine is dead once its
process has exited (or is a zombie), or once this process released it; an owner on
another machine is never known dead: its lease has to run out (see
:meth:`trainwell.study.store.Store.claim`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

_LIVE_OWNERS: set[str] = set()  # owners of this process not released yet


def _host() -> str:
    """This machine (and PID namespace, so two containers never look like one host)."""
    host = socket.gethostname().replace(":", "_")
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")  # 'pid:[4026531836]'
        host += "~" + namespace.split("[")[-1].rstrip("]")
    return host


def new_owner() -> str:
    """A claim owner for this process: ``"host:pid:token"``, unique per call.

    It counts as alive while this process lives, or until :func:`release_owner`.

    Example:
        >>> owner = new_owner()
        >>> owner.split(":")[1] == str(os.getpid()), owner != new_owner()
        (True, True)
    """
    owner = f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    _LIVE_OWNERS.add(owner)
    return owner


def release_owner(owner: str) -> None:
    """Say that ``owner`` (of this process) is done: its leftover claims are free at once."""
    _LIVE_OWNERS.discard(owner)


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` is known to be gone: a process of this host that has exited.

    An owner of another machine is never known dead; its lease has to run out.
    """
    if not owner:
        return True
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return owner not in _LIVE_OWNERS  # released: e.g. an earlier run_study that ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, someone else's
        return False
    with contextlib.suppress(OSError, IndexError):  # a zombie has exited too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    return False
