"""Tests for trainwell.gradients.accumulation: exact weighted-mean gradients vs the full batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainwell.gradients.accumulation import Accumulator, _all_reduce_grads_mean


def net_and_data(seed: int = 0, n: int = 23):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    return net, x, y


def full_grad(net: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(net.parameters())))


def split_sizes(n: int, seed: int) -> list[int]:
    """Unequal micro-batch sizes (1..6) that sum to n."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(torch.randint(1, 7, (1,), generator=g)), n - sum(sizes)))
    return sizes


def run_epoch(net, x, y, k, sizes, scaler=None, use_last=True):
    """Accumulate an epoch; return (per-step grads, per-step item slices)."""
    acc = Accumulator(net, steps=k, scaler=scaler)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    steps, window, start = [], [], 0
    for i, size in enumerate(sizes):
        xb, yb = x[start : start + size], y[start : start + size]
        window.append(slice(start, start + size))
        start += size
        last = use_last and i == len(sizes) - 1
        due = acc.backward(F.cross_entropy(net(xb), yb), weight=size, last=last)
        if not due and i == len(sizes) - 1 and not use_last:
            due = acc.flush()
        if due:
            if scaler is not None:
                scaler.unscale_(opt)
            steps.append(([p.grad.clone() for p in net.parameters()], window))
            window = []
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
    assert acc.flush() is False  # nothing left over
    return steps, acc


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("use_last", [True, False])
def test_unequal_micro_batches_give_full_batch_gradient(k: int, use_last: bool) -> None:
    net, x, y = net_and_data(k, n=41)
    sizes = split_sizes(len(x), seed=k)
    if len(sizes) % k == 0:  # make the last window partial
        i = next(i for i, s in enumerate(sizes) if s > 1)
        sizes[i : i + 1] = [1, sizes[i] - 1]
    steps, acc = run_epoch(net, x, y, k, sizes, use_last=use_last)
    assert len(steps) == math.ceil(len(sizes) / k) == acc.optimizer_steps
    assert len(sizes) % k != 0
    for grads, window in steps:
        idx = torch.cat([torch.arange(s.start, s.stop) for s in window])
        expected = full_grad(net, F.cross_entropy(net(x[idx]), y[idx]))
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_dividing_by_steps_would_fail_this_check() -> None:
    """The naive recipe differs from the full-batch gradient: the reference can fail."""
    net, x, y = net_and_data(1, n=7)
    for size_slice in (slice(0, 2), slice(2, 7)):
        (F.cross_entropy(net(x[size_slice]), y[size_slice]) / 2).backward()
    expected = full_grad(net, F.cross_entropy(net(x), y))
    assert not torch.allclose(net[0].weight.grad, expected[0], atol=1e-6)


def test_padded_token_loss_weighted_by_real_tokens() -> None:
    torch.manual_seed(3)
    vocab, seq = 11, 9
    emb, head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)
    net = torch.nn.Sequential(emb, head)
    batches = []
    for n_seq, pad_from in [(2, 3), (3, 8), (1, 1), (4, 5), (2, 9)]:
        tokens = torch.randint(0, vocab, (n_seq, seq))
        targets = torch.randint(0, vocab, (n_seq, seq))
        targets[:, pad_from:] = -100  # padding
        batches.append((tokens, targets))
    acc = Accumulator(net, steps=3)
    dues = []
    for i, (tokens, targets) in enumerate(batches):
        loss = F.cross_entropy(net(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        n_real = (targets != -100).sum()  # a tensor weight: no host sync
        if acc.backward(loss, weight=n_real, last=i == len(batches) - 1):
            dues.append(i)
            window = batches[: i + 1] if i < 3 else batches[3 : i + 1]
            tok = torch.cat([t.flatten() for t, _ in window])
            tgt = torch.cat([t.flatten() for _, t in window])
            logits = head(emb(tok))
            expected = full_grad(net, F.cross_entropy(logits, tgt, ignore_index=-100))
            for p, e in zip(net.parameters(), expected, strict=True):
                torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6)
    assert dues == [2, 4]


@pytest.mark.parametrize("k", [2, 3])
def test_with_grad_scaler(k: int) -> None:
    net, x, y = net_and_data(5)
    sizes = split_sizes(len(x), seed=11)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    steps, _ = run_epoch(net, x, y, k, sizes, scaler=scaler)
    assert len(steps) == math.ceil(len(sizes) / k)
    for grads, window in steps:
        idx = torch.cat([torch.arange(s.start, s.stop) for s in window])
        expected = full_grad(net, F.cross_entropy(net(x[idx]), y[idx]))
        for g, e in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_stale_gradients_are_cleared_and_zero_weight_is_skipped() -> None:
    net, x, y = net_and_data(2, n=6)
    for p in net.parameters():
        p.grad = torch.full_like(p, 123.0)  # left over from elsewhere
    acc = Accumulator(net, steps=3)
    acc.backward(F.cross_entropy(net(x[:4]), y[:4]), weight=4)
    acc.backward(torch.tensor(float("nan")), weight=0)  # an all-padding micro-batch
    assert acc.backward(F.cross_entropy(net(x[4:]), y[4:]), weight=2)
    expected = full_grad(net, F.cross_entropy(net(x), y))
    for p, e in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6)


def test_no_sync_on_every_micro_step_but_the_last(monkeypatch, tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net, x, y = net_and_data(4, n=10)
        ddp = DDP(net)
        entered: list[int] = []
        original = DDP.no_sync

        def counting_no_sync(self):
            entered.append(1)
            return original(self)

        monkeypatch.setattr(DDP, "no_sync", counting_no_sync)
        acc = Accumulator(ddp, steps=3)
        dues = []
        for i in range(5):  # windows of 3 and a partial one of 2
            loss = F.cross_entropy(ddp(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2])
            dues.append(acc.backward(loss, weight=2, last=i == 4))
        assert dues == [False, False, True, False, True]
        assert len(entered) == 3  # micro-steps 0, 1 and 3 skip the all-reduce
        expected = full_grad(net, F.cross_entropy(net(x[6:]), y[6:]))
        for p, e in zip(net.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6)
        # the manual all-reduce that flush() uses under DDP keeps the mean (world of one)
        _all_reduce_grads_mean(list(net.parameters()))
        for p, e in zip(net.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_state_round_trip_and_bad_arguments() -> None:
    net, x, y = net_and_data(6, n=4)
    acc = Accumulator(net, steps=2)
    for i in range(4):
        acc.backward(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]))
    other = Accumulator(net, steps=2)
    other.load_state_dict(acc.state_dict())
    assert other.state_dict() == acc.state_dict() == {"steps": 2, "optimizer_steps": 2}
    with pytest.raises(ValueError, match="steps=2 but this Accumulator has steps=3"):
        Accumulator(net, steps=3).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        Accumulator(net, steps=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Accumulator("net", steps=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight must be >= 0"):
        acc.backward(F.cross_entropy(net(x), y), weight=-1)
    with pytest.raises(TypeError, match="weight must be a number"):
        acc.backward(F.cross_entropy(net(x), y), weight="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        acc.backward(net(x).sum(1), weight=4)
