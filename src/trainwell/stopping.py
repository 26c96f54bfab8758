"""Early stopping without the usual holes (Prechelt, "Early Stopping - But When?", 1998).

Rule (one metric, ``mode="min"``): a check improves when ``value < best - margin`` with
``margin = min_delta`` (``delta_mode="abs"``) or ``min_delta * abs(best)`` (``"rel"``, right
for negative metrics too); an equal value is not an improvement. ``wait`` counts the
checks since the last improvement and training stops when ``wait`` reaches ``patience``.

Holes closed: a NaN/Inf is never "best" (``nan_policy``); the relative margin uses
``abs(best)``; ``state_dict()`` carries every counter and the smoothing state so a resumed
stopper decides exactly like an uninterrupted one; under ``torch.distributed`` the
monitored metrics are averaged over ranks and the decision is reduced, so all ranks stop at
the same check and none hangs in a collective that the others left.

Direction: ``mode=None`` (the default) takes each metric's direction from its name for the
metrics trainwell itself reports (:data:`METRIC_DIRECTIONS`, after any ``val_`` /
``test_`` / ``train_`` / ``ema_`` / ``swa_`` prefix); any other name must be given a
``mode``, and a ``mode`` that contradicts a known direction (``val_acc`` with ``"min"``) is
an error: judged the wrong way, an improving run stops and restores its worst weights.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from trainwell.distributed import all_reduce_mean, any_rank, is_distributed

_MODES = ("min", "max")
_POLICIES = ("any", "all", "lexicographic")
_NAN_POLICIES = ("stop", "worst", "raise")
_SMOOTHING = (None, "ema", "median")

#: The direction of every metric trainwell reports, by base name (no prefix).
METRIC_DIRECTIONS: dict[str, str] = {
    "loss": "min", "nll": "min", "ece": "min", "brier": "min", "mse": "min", "mae": "min",
    "acc": "max", "r2": "max",
}  # fmt: skip
#: Prefixes a reported metric may carry, in any combination (``"ema_val_acc"``).
METRIC_PREFIXES = ("val_", "test_", "train_", "ema_", "swa_")


def metric_base_name(name: str) -> str:
    """``name`` without any combination of :data:`METRIC_PREFIXES` in front.

    Example:
        >>> metric_base_name("ema_val_acc"), metric_base_name("swa_test_r2")
        ('acc', 'r2')
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in METRIC_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def metric_mode(name: str) -> str | None:
    """``"min"`` or ``"max"`` for a metric trainwell reports, None for any other name.

    Example:
        >>> metric_mode("val_loss"), metric_mode("ema_val_acc"), metric_mode("my_score")
        ('min', 'max', None)
    """
    return METRIC_DIRECTIONS.get(metric_base_name(name))


def resolve_mode(name: str, mode: str | None) -> str:
    """The direction to judge ``name`` by: ``mode``, or the known one when ``mode`` is None.

    Raises:
        ValueError: ``mode`` is not None, "min" or "max"; ``mode`` is None and the name is
            not one trainwell knows; ``mode`` contradicts the known direction.

    Example:
        >>> resolve_mode("val_acc", None), resolve_mode("my_score", "max")
        ('max', 'max')
    """
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode of {name!r} must be 'min', 'max' or None, got {mode!r}")
    known = metric_mode(name)
    if mode is None:
        if known is None:
            raise ValueError(
                f"monitor {name!r} is not a metric trainwell knows the direction of "
                f"({', '.join(METRIC_DIRECTIONS)}, with any val_/test_/train_/ema_/swa_ "
                "prefix); pass mode='min' or mode='max'"
            )
        return known
    if known is not None and mode != known:
        raise ValueError(
            f"mode={mode!r} contradicts monitor {name!r}: {metric_base_name(name)} is better "
            f"{'lower' if known == 'min' else 'higher'}, so its mode is {known!r}; leave mode "
            "unset (or rename the metric if it is not trainwell's)"
        )
    return mode


def improves(
    value: float,
    reference: float | None,
    mode: str = "min",
    min_delta: float = 0.0,
    delta_mode: str = "abs",
) -> bool:
    """True when ``value`` beats ``reference`` by more than the margin; never for NaN/Inf.

    ``margin = min_delta`` (abs) or ``min_delta * abs(reference)`` (rel); any finite value
    improves on ``reference=None`` (nothing seen yet).

    Example:
        >>> improves(-1.05, -1.0, "min", 0.01, "rel")  # 5 % lower than -1.0: better
        True
        >>> improves(1.0, 1.0), improves(float("nan"), None)
        (False, False)
    """
    if not math.isfinite(value):
        return False
    if reference is None:
        return True
    margin = min_delta * abs(reference) if delta_mode == "rel" else min_delta
    return value < reference - margin if mode == "min" else value > reference + margin


def ema(previous: float | None, value: float, alpha: float) -> float:
    """Exponential moving average ``s = alpha * value + (1 - alpha) * s``, started at ``value``.

    Example:
        >>> ema(None, 4.0, 0.5), ema(4.0, 2.0, 0.5)
        (4.0, 3.0)
    """
    return value if previous is None else alpha * value + (1.0 - alpha) * previous


def _per_metric(name: str, arg: Any, names: list[str], default: Any) -> dict[str, Any]:
    """Expand a scalar-or-dict option to {metric: value}, validating names and numbers."""
    if isinstance(arg, Mapping):
        unknown = set(arg) - set(names)
        if unknown:
            raise ValueError(
                f"{name} names unmonitored metrics {sorted(unknown)}; monitored: {names}"
            )
        out = {n: arg.get(n, default) for n in names}
    elif arg is None or len(names) == 1 or name == "min_delta":
        out = {n: arg if arg is not None else default for n in names}
    else:
        raise ValueError(f"{name} must be a dict {{metric: value}} when monitoring {names}")
    for n, v in out.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"{name} for {n!r} must be a number, got {v!r}")
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} for {n!r} must be finite, got {v!r}")
    return out


class EarlyStopping:
    """Stop training when the monitored metric(s) stop improving; safe to resume and under DDP.

    Call it once per validation with a number or a metrics dict; it returns True when
    training should stop, and sets ``improved`` when this check is the new best (save the
    best weights then). Attributes: ``best`` (value, or dict of values, at ``best_step``),
    ``best_step``, ``wait``, ``reason`` (a sentence once stopped), ``improved``.

    Args:
        monitor: a metric name, a list of names (all with ``mode``), or ``{name: mode}``
            (a None mode there: from the name).
        mode: ``"min"``, ``"max"``, or None (default): from the metric's name when it is
            one trainwell reports (:func:`metric_mode`: loss, nll, ece, brier, mse, mae are
            better low; acc, r2 high; any ``val_`` / ``ema_val_`` ... prefix). Any other
            name needs a mode; a mode that contradicts a known name raises ValueError.
        patience: stop after this many checks in a row without improvement (>= 1).
        min_delta: the margin an improvement must exceed (>= 0; a dict per metric).
        delta_mode: ``"abs"`` or ``"rel"`` (margin = ``min_delta * abs(best)``).
        baseline: a value (dict per metric) a check must beat to count as an improvement.
        warmup: the first ``warmup`` checks count for nothing (only NaN is still handled).
        stopping_threshold: stop once every listed metric is at least this good.
        divergence_threshold: stop once any listed metric is worse than this.
        smoothing: judge the raw value (None), an EMA with ``alpha = 2 / (window + 1)``
            (``"ema"``), or the median of the last ``window`` values (``"median"``).
        window: the smoothing window (>= 1).
        nan_policy: on a NaN/Inf metric: ``"stop"``, ``"worst"`` (a non-improving check,
            worse than any threshold) or ``"raise"`` (``FloatingPointError``).
        policy: with several metrics, stop when ``"any"`` has stalled or when ``"all"``
            have; a new best improves on the best step's values in every metric (``"any"``)
            or in one and is worse in none (``"all"``). ``"lexicographic"``: improvement is
            judged on the first metric, ties (within ``min_delta``) broken by the next.
        sync: under ``torch.distributed``, average the metrics over ranks and reduce the
            decision (default True).

    Example:
        >>> stopper = EarlyStopping(patience=2)  # nan_policy="stop": a NaN stops at once
        >>> [stopper(v) for v in [1.0, float("nan"), 0.5]], stopper.reason
        ([False, True, True], 'val_loss is nan')
        >>> stopper = EarlyStopping(patience=2, nan_policy="worst")
        >>> [stopper({"val_loss": v}) for v in [float("nan"), 1.0, 0.9, 0.95, 0.9]]
        [False, False, False, False, True]
        >>> stopper.best, stopper.best_step, stopper.reason
        (0.9, 2, 'val_loss did not improve for 2 checks')
        >>> EarlyStopping(monitor="val_acc").modes  # the direction comes from the name
        {'val_acc': 'max'}
    """

    def __init__(
        self,
        monitor: str | Sequence[str] | Mapping[str, str | None] = "val_loss",
        mode: str | None = None,
        patience: int = 7,
        min_delta: float | Mapping[str, float] = 0.0,
        delta_mode: str = "abs",
        *,
        baseline: float | Mapping[str, float] | None = None,
        warmup: int = 0,
        stopping_threshold: float | Mapping[str, float] | None = None,
        divergence_threshold: float | Mapping[str, float] | None = None,
        smoothing: str | None = None,
        window: int = 5,
        nan_policy: str = "stop",
        policy: str = "any",
        sync: bool = True,
    ) -> None:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be 'min', 'max' or None (from the name), got {mode!r}")
        if isinstance(monitor, str):
            given: dict[str, Any] = {monitor: mode}
        elif isinstance(monitor, Mapping):
            given = dict(monitor)
        elif isinstance(monitor, Sequence):
            given = {name: mode for name in monitor}
        else:
            raise TypeError(f"monitor must be a name, a list of names or a dict, got {monitor!r}")
        if not given or not all(isinstance(n, str) and n for n in given):
            raise ValueError(f"monitor must name at least one metric, got {monitor!r}")
        modes = {name: resolve_mode(name, m) for name, m in given.items()}
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        for arg, value, accepted in (
            ("delta_mode", delta_mode, ("abs", "rel")),
            ("smoothing", smoothing, _SMOOTHING),
            ("nan_policy", nan_policy, _NAN_POLICIES),
            ("policy", policy, _POLICIES),
        ):
            if value not in accepted:
                raise ValueError(f"{arg} must be one of {accepted}, got {value!r}")
        self.names = list(modes)
        self.modes = modes
        self.min_delta = _per_metric("min_delta", min_delta, self.names, 0.0)
        if any(d < 0 for d in self.min_delta.values()):
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.baseline = _per_metric("baseline", baseline, self.names, None)
        self.stopping_threshold = _per_metric(
            "stopping_threshold", stopping_threshold, self.names, None
        )
        self.divergence_threshold = _per_metric(
            "divergence_threshold", divergence_threshold, self.names, None
        )
        self.patience, self.delta_mode, self.warmup = patience, delta_mode, warmup
        self.smoothing, self.window, self.nan_policy = smoothing, window, nan_policy
        self.policy, self.sync = policy, sync
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far (a fresh stopper with the same options)."""
        self.checks = 0
        self.records: dict[str, float | None] = dict.fromkeys(self.names)
        self.waits = dict.fromkeys(self.names, 0)
        self.wait = 0
        self.best_values: dict[str, float] | None = None
        self.best_step: int | None = None
        self.improved = False
        self.stopped = False
        self.reason: str | None = None
        self.last: dict[str, float] = {}
        self._ema: dict[str, float | None] = dict.fromkeys(self.names)
        self._window: dict[str, list[float]] = {n: [] for n in self.names}

    @property
    def best(self) -> float | dict[str, float] | None:
        """The judged (smoothed) value at ``best_step``; a dict when monitoring several."""
        if self.best_values is None or len(self.names) > 1:
            return self.best_values
        return self.best_values[self.names[0]]

    # ------------------------------------------------------------------------ judging
    def _read(self, metrics: float | Mapping[str, Any]) -> dict[str, float]:
        if not isinstance(metrics, Mapping):
            if len(self.names) > 1:
                raise TypeError(f"pass a metrics dict with {self.names}, got {metrics!r}")
            metrics = {self.names[0]: metrics}
        out = {}
        for n in self.names:
            if n not in metrics:
                raise ValueError(f"metrics has no {n!r} (monitor); got {sorted(metrics)}")
            try:
                out[n] = float(metrics[n])
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {n!r} must be a number, got {metrics[n]!r}") from e
        return out

    def _smooth(self, name: str, value: float) -> float:
        if self.smoothing == "ema":
            self._ema[name] = ema(self._ema[name], value, 2.0 / (self.window + 1))
            return self._ema[name]
        if self.smoothing == "median":
            buf = self._window[name]
            buf.append(value)
            del buf[: -self.window]
            return float(statistics.median(buf))
        return value

    def _better(self, n: str, value: float, ref: float | None) -> bool:
        return improves(value, ref, self.modes[n], self.min_delta[n], self.delta_mode)

    def _worse(self, n: str, value: float, ref: float | None) -> bool:
        if ref is None:
            return not math.isfinite(value)
        margin = self.min_delta[n] * abs(ref) if self.delta_mode == "rel" else self.min_delta[n]
        if not math.isfinite(value):
            return True
        return value > ref + margin if self.modes[n] == "min" else value < ref - margin

    def _past(self, n: str, value: float, limit: float) -> bool:
        """Strictly worse than a threshold (no margin); NaN/Inf-as-worst always is."""
        if not math.isfinite(value):
            return True
        return value > limit if self.modes[n] == "min" else value < limit

    def _reference(self, n: str, ref: float | None) -> float | None:
        return self.baseline[n] if ref is None else ref

    def _new_best(self, values: dict[str, float]) -> bool:
        best = self.best_values or {}
        refs = {n: self._reference(n, best.get(n)) for n in self.names}
        if self.policy == "lexicographic":
            for n in self.names:
                if self._better(n, values[n], refs[n]):
                    return True
                if self._worse(n, values[n], refs[n]):
                    return False
            return False
        better = [self._better(n, values[n], refs[n]) for n in self.names]
        if self.policy == "any":
            return all(better)
        return any(better) and not any(self._worse(n, values[n], refs[n]) for n in self.names)

    def _judge(self, raw: dict[str, float], step: int) -> str | None:
        """Update the state with one check; the stop reason, or None to go on."""
        bad = [n for n in self.names if not math.isfinite(raw[n])]
        if bad and self.nan_policy == "raise":
            raise FloatingPointError(f"monitored metric {bad[0]!r} is {raw[bad[0]]} at step {step}")
        if bad and self.nan_policy == "stop":
            return f"{bad[0]} is {raw[bad[0]]}"
        worst = {n: math.inf if self.modes[n] == "min" else -math.inf for n in bad}
        values = {n: worst[n] if n in worst else self._smooth(n, raw[n]) for n in self.names}
        self.last = values
        if self.checks <= self.warmup:
            return None
        for n in self.names:  # per-metric records drive the stall counters
            ref = self._reference(n, self.records[n])
            if self._better(n, values[n], ref):
                self.records[n], self.waits[n] = values[n], 0
            else:
                self.waits[n] += 1
        if self._new_best(values):
            self.improved, self.best_values, self.best_step = True, dict(values), step
        if self.policy == "lexicographic":
            self.wait = 0 if self.improved else self.wait + 1
        else:
            self.wait = (max if self.policy == "any" else min)(self.waits.values())
        for n, limit in self.divergence_threshold.items():
            if limit is not None and self._past(n, values[n], limit):
                return f"{n} crossed divergence_threshold {limit} (value {values[n]:.6g})"
        reached = {n: t for n, t in self.stopping_threshold.items() if t is not None}
        if reached and all(not self._past(n, values[n], t) for n, t in reached.items()):
            listed = ", ".join(f"{n} {values[n]:.6g}" for n in reached)
            return f"reached stopping_threshold ({listed})"
        if self.wait >= self.patience:
            if self.policy == "all" or len(self.names) == 1:
                stalled = ", ".join(self.names)
            elif self.policy == "any":
                stalled = ", ".join(n for n in self.names if self.waits[n] >= self.patience)
            else:
                stalled = ", ".join(self.names) + " (lexicographic)"
            return f"{stalled} did not improve for {self.wait} checks"
        return None

    def __call__(self, metrics: float | Mapping[str, Any], step: int | None = None) -> bool:
        """Judge one validation; True when training should stop (sticky once True).

        ``step`` labels ``best_step`` (default: the number of earlier checks).
        """
        if self.stopped:
            self.improved = False
            return True
        raw = self._read(metrics)
        if self.sync and is_distributed():
            raw = all_reduce_mean(raw)
        step = self.checks if step is None else int(step)
        self.checks += 1
        self.improved = False
        reason = self._judge(raw, step)
        stop = reason is not None
        if self.sync and is_distributed() and any_rank(stop) and not stop:
            stop, reason = True, "another rank decided to stop"
        if stop:
            self.stopped, self.reason = True, reason
        return stop

    # -------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: counters, bests, smoothing state, reason."""
        return {
            "monitor": dict(self.modes),
            "checks": self.checks,
            "records": dict(self.records),
            "waits": dict(self.waits),
            "wait": self.wait,
            "best_values": None if self.best_values is None else dict(self.best_values),
            "best_step": self.best_step,
            "improved": self.improved,
            "stopped": self.stopped,
            "reason": self.reason,
            "last": dict(self.last),
            "ema": dict(self._ema),
            "window": {n: list(v) for n, v in self._window.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; the monitored metrics and their modes must match.

        The state holds the resolved modes (as it always did), so a state saved with an
        explicit ``mode`` loads into a stopper that infers the same one from the name.
        """
        if dict(state["monitor"]) != self.modes:
            raise ValueError(f"state monitors {dict(state['monitor'])}, this stopper {self.modes}")
        self.checks, self.wait = int(state["checks"]), int(state["wait"])
        self.records = {n: state["records"][n] for n in self.names}
        self.waits = {n: int(state["waits"][n]) for n in self.names}
        best = state["best_values"]
        self.best_values = None if best is None else {n: best[n] for n in self.names}
        self.best_step = state["best_step"]
        self.improved, self.stopped = bool(state["improved"]), bool(state["stopped"])
        self.reason = state["reason"]
        self.last = dict(state["last"])
        self._ema = {n: state["ema"][n] for n in self.names}
        self._window = {n: [float(v) for v in state["window"][n]] for n in self.names}
