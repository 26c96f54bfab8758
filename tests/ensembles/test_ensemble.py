"""Ensemble: combine rules against hand computations, vmap == loop, modes, auto, errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from trainwell.app.models import MLP, DigitsCNN
from trainwell.ensembles.ensemble import Ensemble, combine, combine_logits
from trainwell.ensembles.stacked import architecture_problem


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def softmax_by_hand(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------ combine rules
Z = torch.tensor(  # 3 members, 2 samples, 3 classes
    [
        [[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]],
        [[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]],
        [[1.5, 0.0, 1.0], [0.0, 2.0, 0.1]],
    ]
)
W = [0.5, 0.3, 0.2]


def test_mean_prob_and_weighted_mean_prob_match_hand_computation() -> None:
    for weights in (None, W):
        w = [1 / 3] * 3 if weights is None else weights
        expected = [
            [sum(w[m] * softmax_by_hand(Z[m, i].tolist())[c] for m in range(3)) for c in range(3)]
            for i in range(2)
        ]
        got = combine(Z, "mean_prob", weights)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)


def test_mean_logit_and_mean_are_weighted_means_of_raw_outputs() -> None:
    expected = sum(w * Z[m] for m, w in enumerate(W))
    torch.testing.assert_close(combine(Z, "mean_logit", W), expected)
    torch.testing.assert_close(combine(Z, "mean_logit"), (Z[0] + Z[1] + Z[2]) / 3)
    y = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # regression: 2 members, 2 samples
    torch.testing.assert_close(combine(y, "mean"), torch.tensor([2.0, 3.5]))
    torch.testing.assert_close(combine(y, "mean", [3, 1]), torch.tensor([1.5, 2.75]))


def test_geometric_is_the_renormalized_geometric_mean_and_equals_mean_logit() -> None:
    for i in range(2):
        probs = [softmax_by_hand(Z[m, i].tolist()) for m in range(3)]
        geo = [math.prod(probs[m][c] for m in range(3)) ** (1 / 3) for c in range(3)]
        expected = [math.log(g / sum(geo)) for g in geo]
        torch.testing.assert_close(combine(Z, "geometric")[i], torch.tensor(expected))
    torch.testing.assert_close(
        combine(Z, "geometric", W), torch.log_softmax(combine(Z, "mean_logit", W), dim=1)
    )
    # averaging probabilities is a different model from averaging logits
    assert not torch.allclose(combine(Z, "mean_prob"), combine(Z, "mean_logit").softmax(1))


def test_vote_majority_tie_break_by_mean_probability_and_weights() -> None:
    # sample 0: argmax 0, 1, 0 -> class 0 by majority.
    # sample 1: argmax 2, 0, 1 -> three-way tie -> highest mean probability wins.
    got = combine(Z, "vote")
    mean_prob_1 = combine(Z, "mean_prob")[1]
    assert got.tolist() == [0, int(mean_prob_1.argmax())]
    assert got.dtype == torch.int64
    # weighted: member 1 (votes class 1 on sample 0) outweighs members 0 and 2 together.
    assert combine(Z, "vote", [0.2, 0.6, 0.2]).tolist()[0] == 1
    # weighted tie (0.5 vs 0.5) falls back to the weighted mean probability
    two = Z[:2]
    weighted = combine(two, "vote", [1.0, 1.0])
    assert weighted.tolist()[0] == int(combine(two, "mean_prob")[0].argmax())
    # a 1-1 tie goes to the higher mean probability (class 1), not the lower index
    assert combine(torch.tensor([[[1.0, 0.9]], [[0.0, 5.0]]]), "vote").tolist() == [1]


def test_weighted_vote_tie_survives_float_rounding() -> None:
    # members 0, 1, 5 vote class 0 (weights 2.1 + 1.8 + 0.4 = 4.3), members 2, 3, 4 vote
    # class 1 (0.1 + 2.9 + 1.3 = 4.3): a tie, though the float32 sums differ in the last bit
    # (class 0 gets 0.49999997). Class 0 has the higher weighted mean probability: it wins.
    weights = [2.1, 1.8, 0.1, 2.9, 1.3, 0.4]
    strong, weak = [5.0, 0.0], [0.0, 0.1]
    z = torch.tensor([[strong], [strong], [weak], [weak], [weak], [strong]])
    assert combine(z, "mean_prob", weights)[0].argmax() == 0
    assert combine(z, "vote", weights).tolist() == [0]


def test_combine_logits_is_log_of_the_combined_distribution() -> None:
    for weights in (None, W):
        torch.testing.assert_close(
            combine_logits(Z, "mean_prob", weights), combine(Z, "mean_prob", weights).log()
        )
    torch.testing.assert_close(combine_logits(Z, "mean_logit"), combine(Z, "mean_logit"))
    torch.testing.assert_close(combine_logits(Z, "geometric"), combine(Z, "geometric"))
    # a zero weight drops the member exactly
    torch.testing.assert_close(
        combine_logits(Z, "mean_prob", [1.0, 0.0, 0.0]), torch.log_softmax(Z[0], dim=1)
    )


def test_combine_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="combine must be one of"):
        combine(Z, "median")
    with pytest.raises(ValueError, match="one entry per member"):
        combine(Z, "mean_prob", [1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        combine(Z, "mean_prob", [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        combine(Z, "mean_prob", [0.0, 0.0, 0.0])
    with pytest.raises(TypeError, match="weights must be None or a sequence"):
        combine(Z, "mean_prob", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(members, batch, classes, ...\)"):
        combine(Z[:, :, 0], "mean_prob")
    with pytest.raises(TypeError, match="outputs must be a Tensor"):
        combine([[1.0]], "mean")
    with pytest.raises(ValueError, match="combined logits need combine in"):
        combine_logits(Z, "vote")


# ------------------------------------------------------------------ vmap == loop
class Residual(nn.Module):  # not a Sequential: the generic vmap + functional_call pass
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + torch.relu(self.norm(self.a(x))))


ARCHITECTURES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (8, 6)),
    "mlp_batchnorm_dropout": (
        lambda: MLP(6, 3, hidden=(16, 16), norm="batch", dropout=0.3),
        (8, 6),
    ),
    "mlp_layernorm_gelu": (
        lambda: MLP(6, 3, hidden=(16,), norm="layer", activation="gelu"),
        (8, 6),
    ),
    "sequence_layernorm": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)),
        (4, 5, 6),
    ),
    "conv_batchnorm2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        ),
        (8, 2, 6, 6),
    ),
    "digits_cnn": (lambda: DigitsCNN(3, channels=4), (8, 64)),
    "residual": (Residual, (8, 6)),
}


def _trained_stats(members: list[nn.Module], shape: tuple[int, ...]) -> None:
    """Non-trivial weights and BatchNorm statistics; variances small enough for eps to count."""
    with torch.no_grad():
        for m in members:
            m.train()
            for _ in range(3):
                m(torch.randn(shape) * 2 + 0.5)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for module in m.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_var.mul_(1e-2)
                    module.eps = 1e-2


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_vmap_matches_loop(name: str) -> None:
    build, shape = ARCHITECTURES[name]
    members = [build() for _ in range(4)]
    _trained_stats(members, shape)
    x = torch.randn(shape)
    loop = Ensemble(members, method="loop").member_outputs(x)
    ens = Ensemble(members, method="vmap")
    batched = ens.member_outputs(x)
    assert ens.last_method == "vmap"
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)
    reference = torch.stack([m.eval()(x) for m in members])  # plain eval forward
    torch.testing.assert_close(loop, reference, atol=0, rtol=0)
    for rule in ("mean_prob", "mean_logit", "geometric", "vote"):
        a = Ensemble(members, combine=rule, method="vmap").predict(x)
        b = Ensemble(members, combine=rule, method="loop").predict(x)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_agrees_with_loop_and_caches_one_measurement_per_shape(monkeypatch) -> None:
    members = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(4)]
    ens = Ensemble(members)
    calls = []
    measure = ens._measure
    monkeypatch.setattr(ens, "_measure", lambda x, key: calls.append(key) or measure(x, key))
    x = torch.randn(8, 6)
    expected = Ensemble(members, method="loop").predict(x)
    for _ in range(3):
        torch.testing.assert_close(ens.predict(x), expected, atol=1e-5, rtol=1e-5)
    ens.predict(torch.randn(5, 6))
    assert len(calls) == 2 and {k[0] for k in calls} == {(8, 6), (5, 6)}
    assert set(ens.timings[calls[0]]) == {"loop", "vmap", "speedup"}
    assert ens.last_method in ("loop", "vmap")


def _previous_loop(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The loop as it was: list every submodule's flag, eval() if any trains, restore all."""
    outputs = []
    with torch.no_grad():
        for member in members:
            modes = [(m, m.training) for m in member.modules()]
            if any(training for _, training in modes):
                member.eval()
            try:
                outputs.append(member(x))
            finally:
                for m, training in modes:
                    m.training = training
    return torch.stack(outputs)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_loop_is_bit_identical_to_the_plain_loop_and_the_previous_implementation(
    name: str,
) -> None:
    build, shape = ARCHITECTURES[name]
    members = [build() for _ in range(3)]
    _trained_stats(members, shape)
    members[0].eval()  # member 0 in eval, member 1 mixed, member 2 training
    next(m for m in members[1].modules() if m is not members[1]).eval()
    x = torch.randn(shape)
    before = [[m.training for m in member.modules()] for member in members]
    ens = Ensemble(members, method="loop")
    got = ens.member_outputs(x)
    assert [[m.training for m in member.modules()] for member in members] == before
    assert torch.equal(got, _previous_loop(members, x))
    with torch.no_grad():
        plain = torch.stack([m.eval()(x) for m in members])  # the plain loop, all in eval
    assert torch.equal(got, plain)
    for rule in ("mean_prob", "mean_logit", "geometric", "vote"):
        by_rule = Ensemble(members, combine=rule, method="loop").predict(x)
        assert torch.equal(by_rule, combine(plain, rule))


def test_loop_follows_submodules_added_or_put_in_training_after_a_prediction() -> None:
    members = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval() for _ in range(2)]
    ens = Ensemble(members, method="loop")
    x = torch.randn(64, 4)
    expected = ens.member_outputs(x)
    members[1].insert(1, nn.Dropout(0.9))  # a new submodule, in training mode
    members[0][1].train()
    assert torch.equal(ens.member_outputs(x), expected)  # dropout stayed off
    assert members[1][1].training and members[0][1].training  # flags kept
    assert not members[0].training and not members[1][0].training


def test_loop_leaves_eval_members_alone_and_calls_train_only_when_needed() -> None:
    class Counting(nn.Sequential):
        calls = 0

        def train(self, mode: bool = True) -> nn.Module:
            Counting.calls += 1
            return super().train(mode)

    members = [Counting(nn.Linear(4, 3), nn.Dropout(0.5)) for _ in range(2)]
    for m in members:
        m.eval()
    Counting.calls = 0
    ens = Ensemble(members, method="loop")
    ens.predict(torch.randn(5, 4))
    assert Counting.calls == 0  # already in eval: nothing switched or restored
    members[1][1].train()
    Counting.calls = 0
    first, second = ens.predict(torch.ones(5, 4)), ens.predict(torch.ones(5, 4))
    assert torch.equal(first, second) and Counting.calls == 2  # member 1 only, each call
    assert members[1][1].training and not members[1].training and not members[1][0].training


# ------------------------------------------------------------------ modes and autograd
@pytest.mark.parametrize("method", ["loop", "vmap", "auto"])
def test_prediction_uses_eval_mode_no_grad_and_restores_every_flag(method: str) -> None:
    members = [MLP(6, 3, hidden=(16,), norm="batch", dropout=0.5) for _ in range(3)]
    members[1].eval()
    members[2][1].eval()  # a mixed state: only the BatchNorm of member 2 in eval
    before = [[m.training for m in member.modules()] for member in members]
    stats = [member[1].running_mean.clone() for member in members]
    ens = Ensemble(members, method=method)
    x = torch.randn(8, 6, requires_grad=True)
    first, second = ens.predict(x), ens.predict(x)
    torch.testing.assert_close(first, second)  # dropout off: deterministic
    assert not first.requires_grad and not ens.member_outputs(x).requires_grad
    assert [[m.training for m in member.modules()] for member in members] == before
    for member, old in zip(members, stats, strict=True):
        torch.testing.assert_close(member[1].running_mean, old)  # BatchNorm not updated
    with torch.no_grad():
        expected = torch.stack([m.eval()(x) for m in members]).softmax(2).mean(0)
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)


def test_loop_restores_modes_when_a_member_raises() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    members = [nn.Sequential(nn.Dropout(0.5)), Broken()]
    ens = Ensemble(members, method="loop")
    with pytest.raises(RuntimeError, match="boom"):
        ens.predict(torch.randn(2, 3))
    assert all(m.training for member in members for m in member.modules())


# ------------------------------------------------------------------ refresh
def test_vmap_follows_members_after_optimizer_step_load_and_replacement() -> None:
    members = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    ens = Ensemble(members, method="vmap")
    x = torch.randn(5, 4)

    def loop() -> torch.Tensor:
        return Ensemble(list(ens.members), method="loop").member_outputs(x)

    ens.member_outputs(x)
    optimizer = torch.optim.SGD(members[1].parameters(), lr=0.5)
    members[1](x).sum().backward()
    optimizer.step()  # in-place update of member 1
    torch.testing.assert_close(ens.member_outputs(x), loop(), atol=1e-6, rtol=1e-6)
    members[2].load_state_dict(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
    )
    torch.testing.assert_close(ens.member_outputs(x), loop(), atol=1e-6, rtol=1e-6)
    ens.members[0] = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.testing.assert_close(ens.member_outputs(x), loop(), atol=1e-6, rtol=1e-6)
    ens.members[0][0].weight = nn.Parameter(torch.zeros(8, 4))  # replaced object
    ens.refresh()
    torch.testing.assert_close(ens.member_outputs(x), loop(), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ fallbacks
class DataDependent(nn.Module):  # Python control flow on values: impossible under vmap
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def test_auto_falls_back_to_loop_with_a_debug_log_and_vmap_raises(caplog) -> None:
    members = [DataDependent() for _ in range(3)]
    x = torch.randn(6, 4)
    ens = Ensemble(members, method="auto")
    with caplog.at_level(logging.DEBUG, logger="trainwell.ensembles.ensemble"):
        out = ens.predict(x)
    assert ens.last_method == "loop"
    assert any("vmap pass failed" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, Ensemble(members, method="loop").predict(x))
    with pytest.raises(RuntimeError):
        Ensemble(members, method="vmap").predict(x)


class Scaled(nn.Module):  # a hyperparameter the architecture check cannot see (a list)
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc, self.scales = nn.Linear(4, 3), [scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scales[0]


def test_auto_checks_that_vmap_agrees_with_the_loop(caplog) -> None:
    members = [Scaled(1.0), Scaled(3.0)]
    x = torch.randn(6, 4)
    ens = Ensemble(members, method="auto")
    with caplog.at_level(logging.DEBUG, logger="trainwell.ensembles.ensemble"):
        out = ens.member_outputs(x)
    assert ens.last_method == "loop"
    assert any("disagrees with the loop" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]).detach())


def test_different_architectures_vmap_refused_auto_uses_loop(caplog) -> None:
    members = [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3))]
    with pytest.raises(ValueError, match="method='vmap' needs members of one architecture"):
        Ensemble(members, method="vmap")
    ens = Ensemble(members)
    with caplog.at_level(logging.DEBUG, logger="trainwell.ensembles.ensemble"):
        ens.predict(torch.randn(2, 4))
    assert ens.last_method == "loop"
    assert any("uses the loop" in r.getMessage() for r in caplog.records)


def test_architecture_problem_sees_hyperparameters_and_hooks() -> None:
    same_shapes = [nn.Sequential(nn.LeakyReLU(0.1)), nn.Sequential(nn.LeakyReLU(0.3))]
    assert architecture_problem(same_shapes) is not None
    hooked = [nn.Linear(2, 2), nn.Linear(2, 2)]
    hooked[1].register_forward_hook(lambda module, inputs, output: output * 2)
    assert "hooks" in architecture_problem(hooked)
    assert architecture_problem([nn.Linear(2, 2), nn.Linear(2, 2).double()]) is not None


# ------------------------------------------------------------------ API
def test_state_dict_round_trip_and_weights_buffer() -> None:
    make = lambda: [nn.Linear(4, 3) for _ in range(3)]  # noqa: E731
    a = Ensemble(make(), weights=[1, 2, 3])
    b = Ensemble(make(), weights=[1, 1, 1])
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    torch.testing.assert_close(a.predict(x), b.predict(x))
    torch.testing.assert_close(a.weights, torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    assert len(a) == 3 and torch.equal(a(x), a.predict(x))


def test_pickle_and_deepcopy_after_a_batched_prediction() -> None:
    import copy
    import pickle

    ens = Ensemble([nn.Sequential(nn.Linear(4, 3)) for _ in range(3)], method="vmap")
    x = torch.randn(5, 4)
    expected = ens.predict(x)
    for clone in (pickle.loads(pickle.dumps(ens)), copy.deepcopy(ens)):
        torch.testing.assert_close(clone.predict(x), expected)
        with torch.no_grad():
            clone.members[0][0].weight.zero_()  # the clone has its own members
        assert not torch.allclose(clone.predict(x), expected)
    torch.testing.assert_close(ens.predict(x), expected)


def test_predict_logits_softmax_is_the_prediction() -> None:
    members = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(5, 4)
    for rule in ("mean_prob", "mean_logit", "geometric"):
        ens = Ensemble(members, combine=rule)
        expected = ens.predict(x) if rule == "mean_prob" else ens.predict(x).softmax(1)
        torch.testing.assert_close(ens.predict_logits(x).softmax(1), expected)
    with pytest.raises(ValueError, match="combined logits need"):
        Ensemble(members, combine="vote").predict_logits(x)


def test_constructor_and_member_errors() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"models\[1\] must be an nn.Module"):
        Ensemble([nn.Linear(2, 2), "model"])
    with pytest.raises(TypeError, match="not one module"):
        Ensemble(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="method must be one of"):
        Ensemble([nn.Linear(2, 2)], method="fast")
    with pytest.raises(ValueError, match="combine must be one of"):
        Ensemble([nn.Linear(2, 2)], combine="average")
    with pytest.raises(TypeError, match="x must be a Tensor"):
        Ensemble([nn.Linear(2, 2)]).predict([1.0, 2.0])

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(TypeError, match="members must return a Tensor"):
        Ensemble([Pair(), Pair()], method="loop").predict(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="must agree on the output shape"):
        Ensemble([nn.Linear(2, 2), nn.Linear(2, 3)], method="loop").predict(torch.zeros(2, 2))
