"""No orphans, with real processes: children die with their parent, launches forward signals.

- a child that called ``die_with_parent()`` (PDEATHSIG, and the polling fallback) dies
  within seconds of its parent's SIGKILL; one whose parent died before the call dies at
  once;
- spawn ``ProcessPoolExecutor`` workers with ``initializer=worker_init`` die with their
  SIGKILLed owner (without it they wait on their queue forever);
- ``trainwell run --nproc 2``: SIGTERM to the launcher exits 143 and ends the agent and
  both ranks; SIGKILL of the launcher ends them too (the agent dies with the launcher,
  the ranks with the agent);
- a stopped rank makes the other one fail after ``TRAINWELL_COLLECTIVE_TIMEOUT_S``, not
  after gloo's 300 s.

Processes are found through ``/proc``; the file skips where there is none (not Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from trainwell.app.launch import collective_timeout_s, launch
from trainwell.app.lifetime import die_with_parent, exit_status

ROOT = Path(__file__).resolve().parents[2]
HAS_PROC = Path("/proc/self/cmdline").exists() and sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(not HAS_PROC, reason="finds processes through Linux /proc")
DEATH_S = 10.0  # an orphan must be gone this soon after its parent
START_S = 120.0  # generous: four Python processes import torch on a small CI machine


def wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll ``condition`` every 0.1 s until truthy; its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def processes_with(marker: str) -> dict[int, tuple[int, str]]:
    """``{pid: (ppid, command line)}`` of every live process whose command line has ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in cmdline and alive(int(entry.name)):
            ppid = int(next(line for line in status.splitlines() if line.startswith("PPid:"))[5:])
            found[int(entry.name)] = (ppid, cmdline)
    return found


def kill_all(pids: object) -> None:
    """SIGKILL what a failed test left behind (SIGKILL also ends a stopped process)."""
    for pid in list(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def gone_within(pids: object, timeout_s: float) -> float:
    """Seconds until none of ``pids`` is alive; fails after ``timeout_s``."""
    started = time.monotonic()
    pids = set(pids)
    wait_for(lambda: not any(alive(p) for p in pids), timeout_s, f"processes {sorted(pids)} to die")
    return time.monotonic() - started


# --------------------------------------------------------------------------- die_with_parent
PARENT = """
import subprocess, sys, time
child = '''
import os, sys, time
from trainwell.app.lifetime import die_with_parent
die_with_parent(method=sys.argv[2], interval_s=0.2)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
'''
subprocess.Popen([sys.executable, "-c", child, *sys.argv[1:]])
time.sleep(120)
"""


@pytest.mark.parametrize("method", ["auto", "poll"])
def test_a_child_dies_within_seconds_of_its_parents_sigkill(tmp_path: Path, method: str) -> None:
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pidfile), method])
    child = None
    try:
        child = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the child"))
        assert alive(child)
        parent.kill()
        parent.wait()
        seconds = gone_within([child], DEATH_S)
        print(f"{method}: orphan gone {seconds:.2f} s after its parent's SIGKILL")
    finally:
        parent.kill()
        parent.wait()
        kill_all([child] if child else [])


def test_a_child_whose_parent_is_already_gone_dies_at_once() -> None:
    # pid 1 is not this child's parent (pytest is): as if the parent died before the call
    code = "from trainwell.app.lifetime import die_with_parent as d; d(parent_pid=1); print('x')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM and out.stdout == ""


def test_bad_arguments_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="method must be 'auto', 'pdeathsig' or 'poll'"):
        die_with_parent(method="thread")
    with pytest.raises(ValueError, match="interval_s must be a positive number"):
        die_with_parent(interval_s=0)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        collective_timeout_s(0)
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds"):
        launch(2, ["run", "c.toml"], timeout_s=float("nan"))
    monkeypatch.setenv("TRAINWELL_COLLECTIVE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="TRAINWELL_COLLECTIVE_TIMEOUT_S must be a positive"):
        collective_timeout_s(120)
    monkeypatch.setenv("TRAINWELL_COLLECTIVE_TIMEOUT_S", "7.5")
    assert collective_timeout_s(120) == 7.5  # the environment overrides the caller


def test_exit_status_is_a_shells() -> None:
    assert exit_status(-signal.SIGKILL) == 137
    assert exit_status(1, [signal.SIGTERM]) == 143
    assert exit_status(0, [signal.SIGTERM]) == 0  # it finished cleanly anyway


# --------------------------------------------------------------------------- worker pools
OWNER = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor

def pid(_):
    time.sleep(0.5)
    return os.getpid()

if __name__ == "__main__":
    init = None
    if sys.argv[2] == "worker_init":
        from trainwell.app.lifetime import worker_init as init
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context, initializer=init) as pool:
        pids = set(pool.map(pid, range(4)))
        open(sys.argv[1], "w").write(" ".join(map(str, sorted(pids))))
        time.sleep(120)
"""


@pytest.mark.parametrize("initializer", ["worker_init", "none"])
def test_pool_workers_die_with_their_sigkilled_owner(tmp_path: Path, initializer: str) -> None:
    script, pidfile = tmp_path / "owner.py", tmp_path / "workers.pid"
    script.write_text(textwrap.dedent(OWNER))
    command = [sys.executable, str(script), str(pidfile), initializer]
    owner = subprocess.Popen(command, stderr=subprocess.DEVNULL)  # its tracker's leak warning
    workers: list[int] = []
    try:
        text = wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the workers")
        workers = [int(p) for p in str(text).split()]
        assert workers and all(alive(p) for p in workers)
        owner.kill()
        owner.wait()
        if initializer == "none":  # the bug this guards against: idle forever
            time.sleep(2.0)
            assert all(alive(p) for p in workers)
            return
        seconds = gone_within(workers, DEATH_S)
        print(f"{len(workers)} pool workers gone {seconds:.2f} s after their owner's SIGKILL")
    finally:
        owner.kill()
        owner.wait()
        kill_all(workers)


# --------------------------------------------------------------------------- trainwell run
def start_ddp_run(out: Path, **env: str) -> subprocess.Popen:
    """``trainwell run examples/ddp.toml --nproc 2`` that trains until stopped."""
    command = [sys.executable, "-m", "trainwell", "run", str(ROOT / "examples" / "ddp.toml"),
               "--nproc", "2", "--set", "epochs=100000", "--set", "early_stopping.enabled=false",
               "--out", str(out), "--quiet"]  # fmt: skip
    with open(out.parent / "stderr.log", "w") as log:  # a file: a full pipe would block it
        return subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log
        )


def training_tree(launcher: subprocess.Popen, out: Path) -> tuple[int, list[int]]:
    """``(agent pid, rank pids)`` once both ranks train (a checkpoint is written)."""

    def ready() -> tuple[int, list[int]] | None:
        if launcher.poll() is not None:
            log = (out.parent / "stderr.log").read_text()[-3000:]
            pytest.fail(f"the run ended early ({launcher.returncode}): {log}")
        tree = processes_with(str(out))
        agents = [p for p, (ppid, _) in tree.items() if ppid == launcher.pid]
        ranks = [p for p, (ppid, _) in tree.items() if agents and ppid == agents[0]]
        checkpoints = out / "checkpoints"
        started = checkpoints.is_dir() and any(checkpoints.iterdir())
        return (agents[0], ranks) if len(agents) == 1 and len(ranks) == 2 and started else None

    return wait_for(ready, START_S, "two training ranks")  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_stopped_launcher_leaves_no_agent_and_no_rank(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "run"
    launcher = start_ddp_run(out)
    try:
        agent, ranks = training_tree(launcher, out)
        os.kill(launcher.pid, sig)
        returncode = launcher.wait(timeout=DEATH_S + 20)
        seconds = gone_within([agent, *ranks], DEATH_S)
        print(f"{signal.Signals(sig).name}: agent and ranks gone {seconds:.2f} s after the exit")
        assert returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert processes_with(str(out)) == {}
    finally:
        launcher.kill()
        launcher.wait()
        kill_all(processes_with(str(out)))


@pytest.mark.slow
def test_a_stopped_rank_fails_the_other_after_the_collective_timeout(tmp_path: Path) -> None:
    out, timeout_s = tmp_path / "run", 6.0
    launcher = start_ddp_run(out, TRAINWELL_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    stopped = None
    try:
        _, (stopped, other) = training_tree(launcher, out)
        os.kill(stopped, signal.SIGSTOP)
        seconds = gone_within([other], timeout_s + 60)  # gloo's fixed 300 s before the fix
        print(f"the running rank failed {seconds:.2f} s after the other one stopped")
        assert seconds > timeout_s * 0.8  # it waited for the stopped one, then gave up
        os.kill(stopped, signal.SIGCONT)  # the agent's pending SIGTERM ends it now
        assert launcher.wait(timeout=DEATH_S + 20) != 0
        assert "Timed out" in (tmp_path / "stderr.log").read_text()
    finally:
        launcher.kill()
        launcher.wait()
        kill_all(processes_with(str(out)))
