"""The step hook: fit() on any batch, against the default path and full-batch references."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.training.helpers import DictDataset, EpochSampler
from trainwell import Accumulator, StepOutput, fit, supervised_step
from trainwell.training.steps import as_step_output, to_device


def data(n=100, features=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(classes, (n,), generator=g)


def make(seed=0, features=6, classes=3):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(features, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, classes)
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def strip_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def dict_step(model, batch, loss_fn):
    outputs = model(batch["x"])
    return StepOutput(loss_fn(outputs, batch["y"]), outputs, batch["y"], len(batch["y"]))


# ------------------------------------------------------------------ to_device
def test_to_device_moves_tensors_in_nested_containers_and_keeps_the_rest():
    Pair = namedtuple("Pair", "a b")
    batch = {
        "x": torch.zeros(2),
        "nested": [torch.ones(1), ("id", Pair(torch.ones(3), 7))],
        "name": "batch-0",
    }
    moved = to_device(batch, "meta")
    assert moved["x"].is_meta and moved["nested"][0].is_meta
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][1], tuple)
    pair = moved["nested"][1][1]
    assert type(pair) is Pair and pair.a.is_meta and pair.b == 7
    assert moved["name"] == "batch-0" and moved["nested"][1][0] == "id"
    assert not batch["x"].is_meta  # the input is not modified


# ------------------------------------------------------------------ supervised_step
def test_supervised_step_unpacks_inputs_and_targets():
    net = nn.Bilinear(2, 3, 1)
    x1, x2, y = torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 1)
    out = supervised_step(net, [x1, x2, y], F.mse_loss)
    assert isinstance(out, StepOutput) and out.n_items == 4 and out.targets is y
    assert torch.equal(out.outputs, net(x1, x2))
    assert torch.equal(out.loss, F.mse_loss(net(x1, x2), y))


@pytest.mark.parametrize(
    "batch, what",
    [
        ({"x": torch.zeros(2, 6), "y": torch.zeros(2)}, "dict with keys"),
        (torch.zeros(2, 6), "bare tensor of shape"),
        ((torch.zeros(2, 6),), "tuple of length 1"),
    ],
)
def test_unpackable_batch_raises_type_error_naming_step(batch, what):
    model, opt = make()
    with pytest.raises(TypeError, match=rf"{what}.*fit\(step=\.\.\.\)"):
        fit(model, [batch], None, opt, epochs=1)
    with pytest.raises(TypeError, match=r"\[task\] step = \"module:function\""):
        supervised_step(model, batch, F.cross_entropy)


def test_step_results_are_checked():
    assert as_step_output((torch.tensor(1.0), None, None, 3)).n_items == 3
    with pytest.raises(TypeError, match=r"StepOutput\(loss, outputs, targets, n_items\)"):
        as_step_output(torch.tensor(1.0))
    with pytest.raises(TypeError, match="of length 2"):
        as_step_output((torch.tensor(1.0), 2))
    model, opt = make()
    with pytest.raises(TypeError, match="step must be a callable"):
        fit(model, [], None, opt, epochs=1, step="module:function")


# ------------------------------------------------------------------ fit on any batch
def test_dict_batches_with_a_custom_step_equal_tuple_batches_bit_for_bit():
    x, y = data()
    vx, vy = data(40, seed=1)
    runs = []
    for kind in ("tuple", "dict"):
        model, opt = make()
        if kind == "tuple":
            train = DataLoader(TensorDataset(x, y), batch_size=16, sampler=EpochSampler(100))
            val = DataLoader(TensorDataset(vx, vy), batch_size=16)
            kwargs = {}
        else:
            train = DataLoader(DictDataset(x, y), batch_size=16, sampler=EpochSampler(100))
            val = DataLoader(DictDataset(vx, vy), batch_size=16)
            kwargs = {"step": dict_step}
        torch.manual_seed(3)
        result = fit(model, train, val, opt, epochs=3, accumulator=Accumulator(model, 2), **kwargs)
        runs.append((model, strip_time(result.history)))
    (tuple_model, tuple_history), (dict_model, dict_history) = runs
    for a, b in zip(tuple_model.parameters(), dict_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert tuple_history == dict_history
    assert {"val_loss", "val_acc"} <= set(dict_history[0])


def test_explicit_default_step_equals_a_hand_written_loop_bit_for_bit():
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=EpochSampler(100))
    model, opt = make()
    torch.manual_seed(7)
    fit(model, loader, None, opt, epochs=3, step=supervised_step)
    ref, ref_opt = make()
    torch.manual_seed(7)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for xb, yb in loader:
            F.cross_entropy(ref(xb), yb).backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x1, x2):
        return self.head(torch.relu(self.a(x1) + self.b(x2)))


def test_two_input_model_trains_with_the_default_step():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(60, 4, generator=g), torch.randn(60, 2, generator=g)
    y = torch.randint(3, (60,), generator=g)
    loader = DataLoader(TensorDataset(x1, x2, y), batch_size=16, sampler=EpochSampler(60))
    torch.manual_seed(0)
    model = TwoInputs()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = fit(model, loader, loader, opt, epochs=2)
    torch.manual_seed(0)
    ref = TwoInputs()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for a, b, t in loader:
            F.cross_entropy(ref(a, b), t).backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    with torch.no_grad():
        expected = F.cross_entropy(ref(x1, x2), y).item()
    assert result.history[-1]["val_loss"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ token-level accumulation
PAD = -100
VOCAB = 11


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


def token_batches():
    """Micro-batches of different shapes and very different counts of non-padding labels."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for rows, length, real in ((2, 5, 9), (3, 7, 2), (1, 4, 4), (2, 6, 12)):
        tokens = torch.randint(VOCAB, (rows, length), generator=g)
        labels = torch.randint(VOCAB, (rows, length), generator=g).reshape(-1)
        labels[real:] = PAD
        batches.append((tokens, labels.reshape(rows, length)))
    return batches


def token_step(count):
    def step(model, batch, loss_fn):
        tokens, labels = batch
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD)
        return StepOutput(loss, logits, labels, count(labels))

    return step


class RecordGrad:
    """A gradient transform that records the final (accumulated) gradient of each step."""

    def __init__(self):
        self.grads = []

    def apply_(self, params):
        self.grads.append({n: p.grad.clone() for n, p in params})
        return {}


@pytest.mark.parametrize(
    "count",
    [
        lambda labels: (labels != PAD).sum(),  # a tensor, kept on the device
        lambda labels: int((labels != PAD).sum()),
    ],
    ids=["tensor", "int"],
)
def test_accumulated_token_loss_has_the_full_batch_token_mean_gradient(count):
    batches = token_batches()
    torch.manual_seed(0)
    model = TinyLM()
    ref = TinyLM()
    ref.load_state_dict(model.state_dict())
    record = RecordGrad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = fit(model, batches, None, opt, epochs=1, step=token_step(count), transforms=record,
                 accumulator=Accumulator(model, steps=len(batches)))  # fmt: skip
    assert result.steps == 1 and len(record.grads) == 1
    # reference: one loss over every non-padding token of the window
    logits = torch.cat([ref(t).flatten(0, 1) for t, _ in batches])
    labels = torch.cat([y.flatten() for _, y in batches])
    full = F.cross_entropy(logits, labels, ignore_index=PAD)
    full.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(record.grads[0][name], p.grad, rtol=1e-5, atol=1e-7)
    # the train loss is the token-weighted mean too (every forward saw the initial weights)
    assert result.history[0]["train_loss"] == pytest.approx(full.item(), rel=1e-6)
    # weighting by rows instead of tokens (the old bug) gives another gradient
    wrong = RecordGrad()
    torch.manual_seed(0)
    other = TinyLM()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    fit(other, batches, None, opt, epochs=1, step=token_step(len), transforms=wrong,
        accumulator=Accumulator(other, len(batches)))  # fmt: skip
    assert not torch.allclose(wrong.grads[0]["out.weight"], ref.out.weight.grad, rtol=1e-3)
