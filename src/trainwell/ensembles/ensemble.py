"""Model ensembles: a named combination rule, batched prediction, modes left as they were.

* :func:`combine` -- the combination rules. ``"mean_prob"`` averages softmax probabilities
  (Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation using
  Deep Ensembles", NeurIPS 2017); ``"mean_logit"`` averages logits; ``"geometric"``
  averages log-probabilities (the renormalized geometric mean of the members'
  probabilities); ``"mean"`` averages raw outputs (regression); ``"vote"`` is the majority
  of the members' argmax, ties broken by the mean probability. Averaging probabilities and
  averaging logits are different models: ``softmax(mean z) != mean softmax(z)``, and
  ``"geometric"`` gives exactly the distribution of ``"mean_logit"``.
* :func:`combine_logits` -- the combined class distribution in log space, for
  :class:`trainwell.ensembles.calibration.TemperatureScaler` and NLL.
* :class:`Ensemble` -- members in one module; ``method="vmap"`` runs members of one
  architecture in one batched pass (the parameters stacked once, see
  :mod:`trainwell.ensembles.stacked`), ``"loop"`` one member after another, ``"auto"`` measures
  both once per input shape and keeps the faster.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainwell.ensembles.stacked import StackedMembers, architecture_problem

__all__ = ["COMBINE_RULES", "METHODS", "Ensemble", "combine", "combine_logits"]

logger = logging.getLogger("trainwell.ensembles.ensemble")

COMBINE_RULES = ("mean_prob", "mean_logit", "mean", "vote", "geometric")
METHODS = ("auto", "loop", "vmap")
_LOG_SPACE = ("mean_prob", "mean_logit", "geometric")


def _check_rule(rule: object) -> str:
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}; got {rule!r}.")
    return str(rule)


def _weights(weights: Sequence[float] | Tensor | None, n: int) -> Tensor | None:
    """Normalized float32 weights (sum 1), or None for equal weights."""
    if weights is None:
        return None
    try:
        if isinstance(weights, Tensor):
            w = weights.detach().to("cpu", torch.float64).flatten()
        else:
            w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"weights must be None or a sequence of numbers, one per member; got {weights!r}."
        ) from None
    if w.numel() != n:
        raise ValueError(f"weights must have one entry per member ({n}); got {w.numel()}.")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be finite and non-negative with a positive sum.")
    return (w / w.sum()).to(torch.float32)


def _mean(t: Tensor, w: Tensor | None) -> Tensor:
    """Weighted mean over the leading (member) dimension."""
    if w is None:
        return t.mean(0)
    return torch.tensordot(w.to(t.device, t.dtype), t, dims=1)


def _check_outputs(outputs: Tensor, rule: str) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a Tensor (members, batch, ...); got {type(outputs)}.")
    need = 1 if rule == "mean" else 3
    if outputs.dim() < need or outputs.shape[0] == 0:
        what = "(members, ...)" if rule == "mean" else "(members, batch, classes, ...)"
        raise ValueError(
            f"outputs must be stacked member outputs of shape {what} for combine={rule!r}; "
            f"got shape {tuple(outputs.shape)}."
        )


def _combine(outputs: Tensor, rule: str, w: Tensor | None) -> Tensor:
    if rule in ("mean", "mean_logit"):
        return _mean(outputs, w)
    if rule == "geometric":
        return torch.log_softmax(_mean(torch.log_softmax(outputs, dim=2), w), dim=1)
    mean_prob = _mean(torch.softmax(outputs, dim=2), w)
    if rule == "mean_prob":
        return mean_prob
    # vote: (weighted) count of each class among the members' argmax, ties -> mean prob.
    votes = F.one_hot(outputs.argmax(dim=2), outputs.shape[2]).to(mean_prob.dtype)
    counts = (votes.sum(0) if w is None else _mean(votes, w)).movedim(-1, 1)
    tolerance = 0.0 if w is None else 1e-6  # equal weights count exactly
    tied = counts >= counts.amax(dim=1, keepdim=True) - tolerance
    return mean_prob.masked_fill(~tied, -1.0).argmax(dim=1)


def _combine_logits(outputs: Tensor, rule: str, w: Tensor | None) -> Tensor:
    if rule not in _LOG_SPACE:
        raise ValueError(
            f"combined logits need combine in {', '.join(_LOG_SPACE)}; got {rule!r} "
            "(a vote or a mean of raw outputs has no class distribution)."
        )
    if rule == "mean_prob":  # log of the mean probability, computed stably
        log_probs = torch.log_softmax(outputs, dim=2)
        if w is None:
            return torch.logsumexp(log_probs, dim=0) - math.log(outputs.shape[0])
        log_w = w.to(outputs.device, log_probs.dtype).log()
        return torch.logsumexp(log_probs + log_w.view(-1, *[1] * (outputs.dim() - 1)), dim=0)
    return _combine(outputs, rule, w)


def combine(
    outputs: Tensor, rule: str = "mean_prob", weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """Combine stacked member outputs ``(members, batch, classes, ...)`` by one rule.

    With member logits ``z_m``, probabilities ``p_m = softmax(z_m)`` and weights ``w_m``
    (normalized to sum 1; equal when None), the result (classes on dim 1) is:

    * ``"mean_prob"``: ``sum_m w_m p_m`` -- probabilities (Lakshminarayanan et al. 2017).
    * ``"mean_logit"``: ``sum_m w_m z_m`` -- logits.
    * ``"geometric"``: ``log_softmax(sum_m w_m log p_m)`` -- normalized log-probabilities;
      the same distribution as ``"mean_logit"`` (each ``log p_m`` is ``z_m`` minus a
      constant per sample).
    * ``"mean"``: ``sum_m w_m y_m`` of raw outputs of any shape ``(members, ...)``.
    * ``"vote"``: class indices ``(batch, ...)``: the class with the most (weighted) member
      argmax votes; among tied classes, the one with the highest ``"mean_prob"``.

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # 2 members, 1 sample, 2 classes
        >>> combine(z, "mean_logit")
        tensor([[1.0000, 0.5000]])
        >>> combine(z, "vote")  # one vote each; class 0 has the higher mean probability
        tensor([0])
    """
    rule = _check_rule(rule)
    _check_outputs(outputs, rule)
    return _combine(outputs, rule, _weights(weights, outputs.shape[0]))


def combine_logits(
    outputs: Tensor, rule: str = "mean_prob", weights: Sequence[float] | Tensor | None = None
) -> Tensor:
    """The combined class distribution as logits (``softmax`` of it is the prediction).

    ``"mean_prob"``: ``log(sum_m w_m p_m)`` (by logsumexp, stable); ``"mean_logit"``: the mean
    logits; ``"geometric"``: the normalized mean log-probabilities. Temperature scaling of
    an ensemble acts on these (Ashukha et al. 2020 recommend scaling after combining).

    Example:
        >>> z = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
        >>> torch.allclose(combine_logits(z).softmax(1), combine(z, "mean_prob"))
        True
    """
    rule = _check_rule(rule)
    _check_outputs(outputs, rule)
    return _combine_logits(outputs, rule, _weights(weights, outputs.shape[0]))


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(a.dtype, 1e-2)
    return torch.allclose(a, b, rtol=tol, atol=tol / 10, equal_nan=True)


def _any_training(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule is in training mode (walks, builds no list)."""
    if module.training:
        return True
    for child in module._modules.values():
        if child is not None and (child.training or (child._modules and _any_training(child))):
            return True
    return False


def _eval_call(member: nn.Module, x: Tensor) -> Tensor:
    """``member(x)`` in eval mode; each submodule's own ``training`` flag restored after."""
    modes = [(m, m.training) for m in member.modules()]
    member.eval()
    try:
        return member(x)
    finally:
        for m, training in modes:
            if m.training != training:  # nn.Module.__setattr__ is slow: set only what changed
                m.training = training


class Ensemble(nn.Module):
    """Members combined by a named rule; prediction in eval mode, without autograd.

    Prediction never changes the members: ``"loop"`` puts each member in eval mode for its
    forward pass and restores every submodule's own flag afterwards (a member already wholly
    in eval mode, checked at each call, is called as it is); ``"vmap"`` runs an
    eval-mode copy of the architecture on the stacked parameters
    (``torch.func.functional_call`` + ``vmap``; ``nn.Sequential`` members of ``Linear``,
    ``BatchNorm``, ``LayerNorm`` and activations run as batched matmuls). The stacks are
    built at the first prediction and rebuilt when a member's parameter or buffer is
    modified in place (an optimizer step, ``load_state_dict``), moved, or when the list of
    members changes; call :meth:`refresh` after replacing a parameter object by assignment.
    ``"auto"`` runs both once per input (shape, dtype, device), checks that they agree,
    times five adjacent pairs and keeps the faster by the median ratio; if the batched
    pass fails it says so in a debug log of ``logging.getLogger("trainwell.ensembles.ensemble")``
    and uses the loop.

    Args:
        models: the members (at least one ``nn.Module``), each returning one Tensor.
        combine: one of :data:`COMBINE_RULES`, see :func:`combine`.
        weights: None (equal) or one non-negative number per member.
        method: ``"auto"``, ``"loop"`` or ``"vmap"`` (members of one architecture).

    Example:
        >>> torch.manual_seed(0) and None
        >>> members = [nn.Linear(4, 3) for _ in range(5)]
        >>> ens = Ensemble(members, combine="mean_prob", method="vmap")
        >>> x = torch.randn(8, 4)
        >>> ens.member_outputs(x).shape
        torch.Size([5, 8, 3])
        >>> p = ens.predict(x)
        >>> torch.allclose(p, torch.stack([m(x).softmax(1) for m in members]).mean(0))
        True
    """

    def __init__(
        self,
        models: Iterable[nn.Module],
        combine: str = "mean_prob",
        weights: Sequence[float] | Tensor | None = None,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            raise TypeError("models must be an iterable of nn.Module members, not one module.")
        members = list(models)
        if not members:
            raise ValueError("models must hold at least one member.")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module; got {type(m).__name__}.")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
        self.members = nn.ModuleList(members)
        self.combine = _check_rule(combine)
        self.method = method
        self.register_buffer("weights", _weights(weights, len(members)))
        self.last_method: str | None = None  # the method the latest prediction used
        self.timings: dict[tuple, dict[str, float]] = {}  # "auto": best seconds, speedup
        self._stack: StackedMembers | None = None
        self._choice: dict[tuple, str] = {}
        self._choice_ids: tuple[int, ...] = ()
        if method == "vmap":
            problem = architecture_problem(members)
            if problem:
                raise ValueError(f"method='vmap' needs members of one architecture: {problem}")

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stack"] = None  # a cache of closures: rebuilt after unpickling or deepcopy
        return state

    def refresh(self) -> None:
        """Drop the stacked parameters and the "auto" choices; rebuilt when next needed."""
        self._stack = None
        self._choice.clear()

    # ---------------------------------------------------------------- member passes
    def _loop_outputs(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        for i, member in enumerate(self.members):
            # A member already in eval mode (the usual case at inference) runs as it is: no
            # list of its submodules, no flag written. Otherwise see _eval_call.
            y = _eval_call(member, x) if _any_training(member) else member(x)
            if not isinstance(y, Tensor):
                raise TypeError(
                    f"member {i} returned {type(y).__name__}; members must return a Tensor."
                )
            outputs.append(y)
        try:
            return torch.stack(outputs)
        except RuntimeError:  # say which member's shape differs, if that is the reason
            shape = outputs[0].shape
            for i, y in enumerate(outputs):
                if y.shape != shape:
                    raise ValueError(
                        f"member {i} returned shape {tuple(y.shape)}, member 0 "
                        f"{tuple(shape)}; members must agree on the output shape."
                    ) from None
            raise

    def _stacked_outputs(self, x: Tensor) -> Tensor:
        stack = self._stack
        if stack is None or not stack.current(self.members):
            problem = architecture_problem(list(self.members))
            if problem:
                raise ValueError(f"method='vmap' needs members of one architecture: {problem}")
            stack = self._stack = StackedMembers(list(self.members))
        return stack(x)

    def _measure(self, x: Tensor, key: tuple) -> str:
        problem = architecture_problem(list(self.members))
        if problem:
            logger.debug("method='auto' uses the loop: %s", problem)
            return "loop"
        try:
            fast = self._stacked_outputs(x)
        except Exception as exc:  # any failure of the batched pass: say so, use the loop
            logger.debug(
                "method='auto': the vmap pass failed (%s: %s); using the loop",
                type(exc).__name__,
                exc,
                exc_info=True,
            )
            return "loop"
        reference = self._loop_outputs(x)
        if not _close(fast, reference):
            logger.warning("method='auto': the vmap pass disagrees with the loop; using the loop")
            return "loop"
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        seconds: dict[str, list[float]] = {"loop": [], "vmap": []}
        runs = (("loop", self._loop_outputs), ("vmap", self._stacked_outputs))
        for rep in range(5):  # adjacent pairs, alternating order: load drifts cancel out
            for name, run in runs if rep % 2 == 0 else runs[::-1]:
                sync()
                start = time.perf_counter()
                run(x)
                sync()
                seconds[name].append(time.perf_counter() - start)
        ratios = sorted(a / b for a, b in zip(seconds["loop"], seconds["vmap"], strict=True))
        best = {name: min(values) for name, values in seconds.items()}
        self.timings[key] = {**best, "speedup": ratios[2]}
        choice = "vmap" if ratios[2] > 1.0 else "loop"  # median of paired loop/vmap ratios
        logger.debug("method='auto' for input %s: %s (%s)", key, choice, best)
        return choice

    @torch.no_grad()
    def member_outputs(self, x: Tensor) -> Tensor:
        """The members' outputs stacked on a new leading dimension ``(members, batch, ...)``.

        Example:
            >>> ens = Ensemble([nn.Linear(2, 3), nn.Linear(2, 3)], method="loop")
            >>> ens.member_outputs(torch.zeros(4, 2)).shape
            torch.Size([2, 4, 3])
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor; got {type(x).__name__}.")
        method = self.method
        if method == "auto":
            ids = tuple(map(id, self.members))
            if ids != self._choice_ids:
                self._choice.clear()
                self._choice_ids = ids
            key = (tuple(x.shape), x.dtype, x.device)
            method = self._choice.get(key) or self._choice.setdefault(key, self._measure(x, key))
            if method == "vmap":
                try:
                    out = self._stacked_outputs(x)
                except Exception as exc:
                    logger.debug("method='auto': the vmap pass failed (%s); using the loop", exc)
                    self._choice[key] = "loop"
                else:
                    self._used("vmap")
                    return out
                method = "loop"
        self._used(method)
        return self._stacked_outputs(x) if method == "vmap" else self._loop_outputs(x)

    def _used(self, method: str) -> None:
        if self.last_method != method:  # nn.Module.__setattr__ is slow: write on change only
            self.last_method = method

    def predict(self, x: Tensor) -> Tensor:
        """The combined prediction by ``self.combine`` (see :func:`combine` for its kind).

        Example:
            >>> ens = Ensemble([nn.Linear(2, 3), nn.Linear(2, 3)], combine="vote")
            >>> ens.predict(torch.zeros(4, 2)).shape
            torch.Size([4])
        """
        outputs = self.member_outputs(x)
        _check_outputs(outputs, self.combine)
        return _combine(outputs, self.combine, self.weights)

    def predict_logits(self, x: Tensor) -> Tensor:
        """The combined class distribution as logits, see :func:`combine_logits`.

        Example:
            >>> ens = Ensemble([nn.Linear(2, 3), nn.Linear(2, 3)])
            >>> x = torch.randn(4, 2)
            >>> torch.allclose(ens.predict_logits(x).softmax(1), ens.predict(x))
            True
        """
        outputs = self.member_outputs(x)
        _check_outputs(outputs, self.combine)
        return _combine_logits(outputs, self.combine, self.weights)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`predict` (no autograd)."""
        return self.predict(x)

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}, method={self.method!r}"
