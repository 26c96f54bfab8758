"""Tests for trainwell.averaging.soups (greedy and uniform model soups)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

from trainwell.averaging.soups import greedy_soup, uniform_soup
from trainwell.averaging.weights import average_weights, update_bn


class OneHot(nn.Module):
    """Ingredient i has weight e_i, so a soup's weight reveals the set it averages."""

    def __init__(self, i: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        with torch.no_grad():
            self.weight[i] = 1.0


def members(model: nn.Module) -> frozenset[int]:
    return frozenset(torch.nonzero(model.weight).flatten().tolist())


def fake_evaluate(table: dict[frozenset[int], float], default: float = 0.0):
    calls = []

    def evaluate(model: nn.Module) -> float:
        calls.append(members(model))
        return table.get(members(model), default)

    return evaluate, calls


def reference_greedy(scores: dict[frozenset[int], float], n: int) -> list[int]:
    """Wortsman et al. 2022, Recipe 1, written out plainly."""
    order = sorted(range(n), key=lambda i: -scores[frozenset([i])])
    chosen, best = [order[0]], scores[frozenset([order[0]])]
    for i in order[1:]:
        score = scores[frozenset([*chosen, i])]
        if score >= best:
            chosen, best = [*chosen, i], score
    return chosen


def test_greedy_soup_known_scores():
    n = 5
    models = [OneHot(i, n) for i in range(n)]
    table = {frozenset([i]): s for i, s in enumerate([0.70, 0.90, 0.60, 0.85, 0.80])}
    table |= {
        frozenset([1, 3]): 0.91,  # better: kept
        frozenset([1, 3, 4]): 0.89,  # worse: dropped
        frozenset([0, 1, 3]): 0.91,  # a tie is not worse: kept
        frozenset([0, 1, 2, 3]): 0.95,  # the weakest ingredient still helps
    }
    evaluate, calls = fake_evaluate(table)
    soup, chosen, history = greedy_soup(models, evaluate)
    assert chosen == [1, 3, 0, 2]
    assert members(soup) == frozenset(chosen)
    torch.testing.assert_close(soup.weight, average_weights([models[i] for i in chosen]).weight)
    assert [h["index"] for h in history] == [1, 3, 4, 0, 2]
    assert [h["accepted"] for h in history] == [True, True, False, True, True]
    assert [h["soup_score"] for h in history] == [0.90, 0.91, 0.89, 0.91, 0.95]
    assert all(h["score_recalibrated"] is None and not h["recalibrated"] for h in history)
    assert len(calls) == n + n - 1  # each ingredient once, then each candidate once
    # the same problem as a loss: mode="min" with negated scores picks the same soup
    neg = {k: -v for k, v in table.items()}
    _, chosen_min, _ = greedy_soup(models, fake_evaluate(neg)[0], mode="min")
    assert chosen_min == chosen


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_matches_reference_on_random_scores(seed):
    rng = random.Random(seed)
    n = 6
    models = [OneHot(i, n) for i in range(n)]

    class Table(dict):
        def __missing__(self, key):
            self[key] = rng.random()
            return self[key]

    table = Table()
    for i in range(n):
        table[frozenset([i])] = rng.random()
    _, chosen, history = greedy_soup(models, lambda m: table[members(m)])
    assert chosen == reference_greedy(table, n)
    best_single = max(table[frozenset([i])] for i in range(n))
    assert max(h["soup_score"] for h in history if h["accepted"]) >= best_single


def test_greedy_soup_nan_scores_never_win():
    models = [OneHot(i, 3) for i in range(3)]
    table = {frozenset([0]): math.nan, frozenset([1]): 0.5, frozenset([2]): 0.4}
    table[frozenset([1, 2])] = math.nan
    _, chosen, history = greedy_soup(models, fake_evaluate(table)[0])
    assert chosen == [1]
    assert [h["index"] for h in history] == [1, 2, 0]


def bn_models(k: int = 3) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        net.train()
        for _ in range(3):
            net(torch.randn(16, 3) * (seed + 1) + seed)
        out.append(net.eval())
    return out


def test_greedy_soup_measures_bn_recalibration():
    models = bn_models()
    data = [torch.randn(32, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def staleness(model: nn.Module) -> float:
        fresh = copy.deepcopy(model)
        update_bn(fresh, data)
        return float((model[1].running_mean - fresh[1].running_mean).abs().sum())

    # an evaluate that rewards fresh statistics: recalibration wins every time
    soup, chosen, history = greedy_soup(models, lambda m: -staleness(m), recalibrate_bn=data)
    assert all(h["recalibrated"] and h["score"] < h["score_recalibrated"] for h in history)
    assert sorted(chosen) == [0, 1, 2]  # recalibrated soups all score 0: ties are kept
    expected = average_weights(models)
    update_bn(expected, data)
    torch.testing.assert_close(soup[1].running_mean, expected[1].running_mean)
    torch.testing.assert_close(soup[0].weight, expected[0].weight)
    assert not soup.training  # the mode of the first ingredient

    # one that rewards stale statistics: recalibration is measured and never used
    soup2, chosen2, history2 = greedy_soup(models, staleness, recalibrate_bn=data, mode="max")
    assert all(h["score_recalibrated"] is not None for h in history2)
    assert not any(h["recalibrated"] for h in history2)
    torch.testing.assert_close(
        soup2[1].running_mean, average_weights([models[i] for i in chosen2])[1].running_mean
    )


def test_uniform_soup_is_the_mean():
    models = bn_models()
    soup = uniform_soup(models)
    mean = sum(m[0].weight for m in models) / 3
    torch.testing.assert_close(soup[0].weight, mean, atol=1e-6, rtol=0)
    assert torch.equal(soup[1].num_batches_tracked, models[0][1].num_batches_tracked)


def test_greedy_soup_bad_input():
    models = [OneHot(i, 2) for i in range(2)]
    with pytest.raises(ValueError, match="mode must be 'max' or 'min'"):
        greedy_soup(models, lambda m: 0.0, mode="best")
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        greedy_soup(models, 0.5)
    with pytest.raises(TypeError, match="evaluate\\(model\\) must return a number"):
        greedy_soup(models, lambda m: "good")
    with pytest.raises(ValueError, match="non-empty list or tuple"):
        greedy_soup([], lambda m: 0.0)


def test_digits_greedy_soup_not_worse_than_best_ingredient(capsys):
    """Fine-tune ingredients from one pre-trained MLP on sklearn's digits; soup them."""
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    bunch = datasets.load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    xtr, ytr, xva, yva = x[:1000], y[:1000], x[1000:1400], y[1000:1400]
    xte, yte = x[1400:], y[1400:]

    def train(model: nn.Module, steps: int, lr: float, seed: int) -> nn.Module:
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(ytr), (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        return model.eval()

    @torch.no_grad()
    def accuracy(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> float:
        model.eval()
        return float((model(xs).argmax(1) == ys).float().mean())

    base = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    train(base, 60, 0.05, seed=0)
    ingredients = [
        train(copy.deepcopy(base), 80, lr, seed=s)
        for s, lr in enumerate([0.01, 0.03, 0.05, 0.1, 0.2], start=1)
    ]
    val = [accuracy(m, xva, yva) for m in ingredients]
    batches = [xtr[i : i + 100] for i in range(0, 1000, 100)]
    soup, chosen, _ = greedy_soup(
        ingredients, lambda m: accuracy(m, xva, yva), recalibrate_bn=batches
    )
    soup_val = accuracy(soup, xva, yva)
    assert soup_val >= max(val)
    best = ingredients[max(range(len(val)), key=val.__getitem__)]
    with capsys.disabled():
        print(
            f"\ndigits test accuracy: best ingredient {accuracy(best, xte, yte):.4f}, "
            f"uniform soup {accuracy(uniform_soup(ingredients), xte, yte):.4f}, "
            f"greedy soup {accuracy(soup, xte, yte):.4f} (chosen {chosen})"
        )
