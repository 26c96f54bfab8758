"""Where a study's runs execute: the ``[ablation.resources]`` of one run, and the Ray executor.

``trainwell ablate CONFIG --executor ray [--address HOST:6379]`` trains each (variant,
data size, seed) run as a Ray task asking for the CPUs and GPUs of
``[ablation.resources]``::

    [ablation.resources]
    cpus = 1        # per run; above 1 the run also gets that many torch threads
    gpus = 0        # per run, fractions allowed; with device = "auto" a run uses its GPU

The driver (the process that runs the study) alone touches the results store: it claims
each run there as the local pool does (:meth:`trainwell.study.store.Store.claim`),
submits it, keeps its lease while the task runs and records the result when it comes
back. At most ``jobs`` tasks are submitted and unfinished at once. A task lost with its
worker or its node is retried by Ray (``max_retries``) and then by the driver, up to
:data:`RETRIES` times each; a run whose own code raised is a failed run, stored with the
one-line message the local pool stores. A killed driver run again skips what finished.

Ray is imported here only inside functions: it is the optional extra ``trainwell[ray]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from trainwell.app.config import ConfigError
from trainwell.study.failures import error_line

EXECUTORS = ("local", "ray")
RESOURCE_KEYS = ("cpus", "gpus")
RETRIES = 2  # Ray's retries of a task whose worker died, then the driver's resubmissions
NEEDS_RAY = "--executor ray needs Ray: pip install 'trainwell[ray]'"


@dataclass(frozen=True)
class Resources:
    """What one run asks of a Ray node: ``cpus`` and ``gpus`` (fractions allowed)."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        """Torch threads of a run: one, or its whole number of CPUs when it asks for more."""
        return max(1, int(self.cpus))


def resource_problems(table: Any) -> list[str]:
    """What is wrong with an ``[ablation.resources]`` table, one line each; [] when fine.

    Example:
        >>> resource_problems({"cpus": 2, "gpus": 0.5}), resource_problems(None)
        ([], [])
        >>> resource_problems({"cpus": -1, "tpus": 1})
        ["ablation.resources: unknown key(s) ['tpus']; accepted: cpus, gpus", 'ablation.resources.cpus must be a non-negative number, got -1']
    """  # noqa: E501
    if table is None:
        return []
    if not isinstance(table, dict):
        return [f"ablation.resources must be a table (cpus, gpus per run), got {table!r}"]
    problems = []
    unknown = sorted(set(table) - set(RESOURCE_KEYS))
    if unknown:
        problems.append(
            f"ablation.resources: unknown key(s) {unknown}; accepted: {', '.join(RESOURCE_KEYS)}"
        )
    for key in RESOURCE_KEYS:
        value = table.get(key, 0)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            problems.append(
                f"ablation.resources.{key} must be a non-negative number, got {value!r}"
            )
    return problems


def read_resources(ablation: Any) -> Resources:
    """The :class:`Resources` of one run from an ``[ablation]`` table (defaults: 1 CPU, 0 GPUs).

    A bad table is a :class:`~trainwell.app.config.ConfigError`, one line per problem.

    Example:
        >>> read_resources({"resources": {"cpus": 2}})
        Resources(cpus=2.0, gpus=0.0)
    """
    table = ablation.get("resources") if isinstance(ablation, dict) else None
    problems = resource_problems(table)
    if problems:
        raise ConfigError("\n".join(problems))
    return Resources(**{k: float(v) for k, v in (table or {}).items()})


class Claims(Protocol):
    """A study's runs as an executor sees them (``run_study`` makes one)."""

    poll: float  # seconds between asks while other processes hold the study's runs

    def claim(self) -> int | None:
        """Claim one free run in the store (its lease is kept); None when none is free."""

    def config(self, run_id: int) -> dict[str, Any]:
        """The raw config of a claimed run."""

    def record(self, run_id: int, ok: bool, payload: Any) -> None:
        """Store a run's result (``work``'s return value) and drop its claim."""

    def others_left(self) -> bool:
        """Whether runs are still pending or held by other processes."""

    def tick(self) -> None:
        """Refresh the progress display."""


def require_ray() -> Any:
    """The ``ray`` module, or a one-line ``ValueError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(NEEDS_RAY) from None
    return ray


def _task(work: Callable[[dict[str, Any]], Any], raw: dict[str, Any], threads: int) -> Any:
    """One run in a Ray worker, with ``threads`` torch threads (Ray reuses its workers)."""
    import torch

    torch.set_num_threads(threads)
    return work(raw)


def lost(err: BaseException) -> bool:
    """True when a task failed with its worker, node or object, not because of its code."""
    from ray import exceptions as rex

    system = (
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.LocalRayletDiedError,
        rex.ObjectLostError,
        rex.OutOfMemoryError,
        rex.RaySystemError,
    )
    if isinstance(err, rex.RayTaskError):
        return isinstance(err.cause, system)
    return isinstance(err, system)


def _capacity(ray: Any, resources: Resources) -> int:
    """How many runs of ``resources`` the cluster fits at once (at least one)."""
    total = ray.cluster_resources()
    fits = [
        total.get(name, 0.0) / need
        for name, need in (("CPU", resources.cpus), ("GPU", resources.gpus))
        if need > 0
    ]
    return max(1, int(min(fits, default=1024)))


def run_on_ray(
    claims: Claims,
    work: Callable[[dict[str, Any]], tuple[bool, Any]],
    *,
    jobs: int | None,
    resources: Resources,
    address: str | None = None,
) -> None:
    """Train every run ``claims`` hands out as a Ray task running ``work(config)``.

    ``work`` returns ``(ok, payload)`` and never raises (``execute._safe_run``). Connects
    to the cluster at ``address``, or starts a local Ray instance when ``address`` is
    None; an already initialized Ray (``ray.init`` called before) is used as it is.
    ``jobs`` caps the tasks in flight (None: as many as the cluster's CPUs and GPUs fit).
    """
    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        quiet = {} if address else {"include_dashboard": False}
        ray.init(address=address, **quiet)
    # Ray hides no GPU from a task that asks for none: hide them, so device = "auto" is cpu
    hidden = {} if resources.gpus else {"runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    task = ray.remote(_task).options(
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        max_retries=RETRIES,
        retry_exceptions=False,  # work() returns its own errors: only lost workers retry
        **hidden,
    )
    jobs = jobs or _capacity(ray, resources)
    running: dict[Any, int] = {}  # ObjectRef -> run id
    resubmitted: dict[int, int] = {}  # run id -> times the driver submitted it again

    def submit(run_id: int) -> None:
        running[task.remote(work, claims.config(run_id), resources.threads)] = run_id

    try:
        next_claim = 0.0  # when to ask the store again after it had nothing free
        while True:
            next_claim = claims.top_up(running, jobs, next_claim, submit)
            if not running:
                if not claims.idle(next_claim):
                    break
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in finished:
                run_id = running.pop(ref)
                try:
                    ok, payload = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - the task's worker or node died
                    if lost(err) and resubmitted.get(run_id, 0) < RETRIES:
                        resubmitted[run_id] = resubmitted.get(run_id, 0) + 1
                        submit(run_id)
                        continue
                    ok, payload = False, (f"worker process failed: {error_line(err)}", None)
                claims.record(run_id, ok, payload)
                next_claim = 0.0  # a slot is free: claim at once
            claims.tick()
    finally:
        for ref in running:  # an error or Ctrl-C: the claims are released by the caller
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
