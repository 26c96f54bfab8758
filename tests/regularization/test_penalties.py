"""Tests for trainwell.regularization.penalties: each against a hand-written reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainwell.regularization.penalties import DEFAULT_EXCLUDE, Regularizer, max_norm_, param_groups


class Net(nn.Module):
    """Linear + conv + every normalization type + an embedding; norm names hide their type."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 4, 3)
        self.proj = nn.BatchNorm1d(4)  # a norm layer whose name does not say so
        self.fc = nn.Linear(4, 8)
        self.mix = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.conv(self.emb(idx).transpose(1, 2))).mean(-1)
        h = self.rms(self.gn(self.mix(self.fc(h))))
        return self.head(h)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-trivial norm parameters, and an exact zero for sign(0)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.fc.weight[0, 0] = 0.0
    return net


def loss_of(net: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return net(torch.randint(0, 10, (5, 7))).square().mean()


def reference_penalty(net: nn.Module, strengths: dict[str, tuple[float, float]]) -> torch.Tensor:
    """The naive per-parameter loop over an explicit, hand-chosen name -> (l1, l2) table."""
    params = dict(net.named_parameters())
    return sum(
        l1 * params[n].abs().sum() + l2 * params[n].square().sum()
        for n, (l1, l2) in strengths.items()
    )


DEFAULT_INCLUDED = ["emb.weight", "conv.weight", "fc.weight", "head.weight"]


def grads_after(net: nn.Module, extra: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    loss = loss_of(net)
    (loss if extra is None else loss + extra).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("l1,l2", [(1e-2, 0.0), (0.0, 3e-2), (2e-3, 5e-2)])
def test_apply_matches_reference_penalty_gradient(l1: float, l2: float) -> None:
    net = make_net()
    ref_net = copy.deepcopy(net)
    expected = grads_after(
        ref_net, reference_penalty(ref_net, dict.fromkeys(DEFAULT_INCLUDED, (l1, l2)))
    )
    got = grads_after(net)
    Regularizer(l1=l1, l2=l2).apply_(net)
    got = {n: p.grad for n, p in net.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_apply_equals_penalty_backward_and_penalty_value() -> None:
    reg = Regularizer(l1=3e-3, l2=2e-2, per_layer={"head.*": (0.0, 0.5)})
    net, ref = make_net(), make_net()
    strengths = dict.fromkeys(DEFAULT_INCLUDED, (3e-3, 2e-2)) | {"head.weight": (0.0, 0.5)}
    torch.testing.assert_close(reg.penalty(ref), reference_penalty(ref, strengths))
    expected = grads_after(ref, reg.penalty(ref))
    grads_after(net)
    reg.apply_(net)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_sign_of_zero_is_zero_and_grad_created_when_none() -> None:
    net = make_net()
    Regularizer(l1=1.0).apply_(net)  # no backward: every .grad is None
    assert net.fc.weight.grad[0, 0] == 0.0
    torch.testing.assert_close(net.fc.weight.grad, torch.sign(net.fc.weight.detach()))
    assert net.fc.bias.grad is None and net.mix.weight.grad is None  # excluded stay None


def test_apply_adds_once_per_call_with_cached_lists() -> None:
    net = make_net()
    reg = Regularizer(l2=0.25)
    reg.apply_(net)
    groups = reg._groups(net)
    reg.apply_(net)
    assert reg._groups(net) is groups  # resolved once
    torch.testing.assert_close(net.head.weight.grad, net.head.weight.detach())  # 2 * (2*0.25*w)


def _previous_apply_(reg: Regularizer, model: nn.Module) -> None:
    """The L1/L2 gradient as apply_ computed it before: two whole-list foreach passes."""
    with torch.no_grad():
        for l1, l2, params in reg._groups(model):
            ps = [p for p in params if p.requires_grad]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in ps]
            if ps and l2 > 0:
                torch._foreach_add_(grads, ps, alpha=2.0 * l2)
            if ps and l1 > 0:
                torch._foreach_add_(grads, torch._foreach_sign(ps), alpha=l1)


def _mixed_model() -> nn.Module:
    """Large, small, strided (channels_last), float64 and float16 weights, exact zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(300, 701),  # 210_300 elements: several pieces at the patched piece size
        nn.Linear(701, 3),
        nn.Conv2d(16, 32, 3).to(memory_format=torch.channels_last),  # strided, 4_608
        nn.Conv2d(64, 64, 5).to(memory_format=torch.channels_last),  # strided, > a piece
        nn.Linear(5, 7).double(),
        nn.Linear(64, 65).half(),
        nn.Linear(4, 4),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.masked_fill_(p.abs() < 0.01, 0.0)  # sign(0) = 0
    for i, p in enumerate(model.parameters()):
        if i % 3 != 2:  # a few stay None: apply_ creates them
            p.grad = torch.randn_like(p)
    return model


@pytest.mark.parametrize("piece_bytes", [None, 1 << 14])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("l1,l2", [(1e-3, 0.0), (2.5e-3, 7e-4), (0.3, 0.9)])
def test_apply_is_bit_identical_to_the_previous_foreach_passes(
    monkeypatch, piece_bytes: int | None, threads: int, l1: float, l2: float
) -> None:
    import trainwell.regularization.penalties as penalties

    if piece_bytes is not None:  # many pieces, the small batch split, oversized strided
        monkeypatch.setattr(penalties, "_PIECE_BYTES_PER_THREAD", piece_bytes)
        monkeypatch.setattr(penalties, "_SMALL_ELEMENTS", 256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _mixed_model()
        expected = copy.deepcopy(model)  # parameters only: copy the gradients too
        for p, q in zip(model.parameters(), expected.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        reg = Regularizer(l1=l1, l2=l2, exclude=())
        for _ in range(2):  # the second call reuses the buffers
            reg.apply_(model)
            _previous_apply_(reg, expected)
    finally:
        torch.set_num_threads(before)
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_apply_reuses_one_bounded_sign_buffer_per_dtype(monkeypatch) -> None:
    import trainwell.regularization.penalties as penalties

    monkeypatch.setattr(penalties, "_PIECE_BYTES_PER_THREAD", 1 << 14)
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 100).double())
    reg = Regularizer(l1=1e-3)
    reg.apply_(model)
    buffers = {dtype: buf.data_ptr() for dtype, buf in reg._sign_buffers.items()}
    assert set(buffers) == {torch.float32, torch.float64}
    limit = penalties._piece_elements()
    assert all(buf.numel() == limit for buf in reg._sign_buffers.values())  # not param-sized
    model.zero_grad(set_to_none=True)  # fresh .grad tensors: still correct, same buffers
    reg.apply_(model)
    assert {d: b.data_ptr() for d, b in reg._sign_buffers.items()} == buffers
    for layer in model:
        torch.testing.assert_close(layer.weight.grad, 1e-3 * layer.weight.detach().sign())


def test_exclusion_by_module_type_and_embedding_option() -> None:
    net = make_net()
    rows = {r["name"]: r for r in Regularizer(l2=1.0).report(net)}
    assert [n for n, r in rows.items() if r["reason"] is None] == DEFAULT_INCLUDED
    for name in ["proj.weight", "proj.bias", "mix.weight", "mix.bias", "gn.weight", "rms.weight"]:
        assert rows[name]["reason"] == "norm layer", name
        assert rows[name]["l2"] == 0.0
    assert rows["fc.bias"]["reason"] == "bias"
    assert rows["fc.weight"]["shape"] == [8, 4] and rows["fc.weight"]["l2"] == 1.0
    rows = {
        r["name"]: r
        for r in Regularizer(l2=1.0, exclude=[*DEFAULT_EXCLUDE, "embedding"]).report(net)
    }
    assert rows["emb.weight"]["reason"] == "embedding"
    rows = {r["name"]: r for r in Regularizer(l2=1.0, exclude=["conv.*"]).report(net)}
    assert rows["conv.weight"]["reason"] == "pattern 'conv.*'"
    assert (
        rows["fc.bias"]["reason"] is None and rows["mix.weight"]["reason"] is None
    )  # no categories


def test_per_layer_strengths_last_match_wins() -> None:
    net = make_net()
    reg = Regularizer(l2=0.1, per_layer={"*.weight": (0.0, 0.2), "head.weight": {"l1": 0.3}})
    rows = {r["name"]: (r["l1"], r["l2"]) for r in reg.report(net) if r["reason"] is None}
    assert rows == {
        "emb.weight": (0.0, 0.2),
        "conv.weight": (0.0, 0.2),
        "fc.weight": (0.0, 0.2),
    } | {"head.weight": (0.3, 0.0)}
    reg.apply_(net)
    torch.testing.assert_close(net.fc.weight.grad, 0.4 * net.fc.weight.detach())
    torch.testing.assert_close(net.head.weight.grad, 0.3 * torch.sign(net.head.weight.detach()))


def test_frozen_parameters_are_skipped() -> None:
    net = make_net()
    net.conv.weight.requires_grad_(False)
    reg = Regularizer(l2=1.0)
    assert {r["name"]: r["reason"] for r in reg.report(net)}["conv.weight"] == "frozen"
    reg.apply_(net)
    assert net.conv.weight.grad is None
    net.conv.weight.requires_grad_(True)  # unfreezing is seen without clearing the cache
    reg.apply_(net)
    assert net.conv.weight.grad is not None


def test_bad_arguments_raise_with_a_sentence() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        Regularizer(l1=-1.0)
    with pytest.raises(TypeError, match="l2 must be a non-negative number"):
        Regularizer(l2="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"l2 must be a finite number >= 0.*-0.5"):
        Regularizer(per_layer={"fc.*": (0.0, -0.5)})
    with pytest.raises(TypeError, match="must be a pair"):
        Regularizer(per_layer={"fc.*": 0.1})
    with pytest.raises(ValueError, match="exclude pattern 'decoder.\\*' matches no parameter"):
        Regularizer(l2=1.0, exclude=["decoder.*"]).apply_(net)
    with pytest.raises(ValueError, match="per_layer pattern 'decoder.\\*' matches no parameter"):
        Regularizer(per_layer={"decoder.*": (0.0, 1.0)}).penalty(net)
    with pytest.raises(ValueError, match="'mix.\\*' matches only excluded"):
        Regularizer(per_layer={"mix.*": (0.0, 1.0)}).report(net)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        param_groups(net, -0.1)
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        max_norm_(net, 0.0)


def test_sparse_gradient_raises() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        Regularizer(l2=1.0).apply_(emb)
    Regularizer(l2=1.0, exclude=["embedding"]).penalty(emb)  # excluded: fine


def test_penalty_is_zero_without_included_parameters() -> None:
    assert Regularizer(l2=1.0).penalty(nn.LayerNorm(4)).item() == 0.0


def test_param_groups_and_sgd_equivalence_of_l2_and_weight_decay() -> None:
    net = make_net()
    groups = param_groups(net, weight_decay=0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [names[id(p)] for p in groups[0]["params"]] == DEFAULT_INCLUDED
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    # SGD: weight_decay=wd on the included group == Regularizer(l2=wd/2) in the gradient.
    a, b = make_net(), make_net()
    opt_a = torch.optim.SGD(param_groups(a, 0.05), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        grads_after(a)
        opt_a.step()
        grads_after(b)
        Regularizer(l2=0.025).apply_(b)
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    # Adam: L2 in the gradient is *not* decoupled decay (Loshchilov & Hutter).
    c, d = make_net(), make_net()
    opt_c = torch.optim.AdamW(param_groups(c, 0.05), lr=0.1)
    opt_d = torch.optim.Adam(d.parameters(), lr=0.1)
    grads_after(c)
    opt_c.step()
    grads_after(d)
    Regularizer(l2=0.025).apply_(d)
    opt_d.step()
    assert not torch.allclose(c.fc.weight, d.fc.weight)


def test_max_norm_matches_renorm_and_skips_biases() -> None:
    net = make_net()
    with torch.no_grad():
        net.fc.weight.mul_(10.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    largest = max_norm_(net, 1.5)
    expected_max = max(before[n].flatten(1).norm(dim=1).max() for n in DEFAULT_INCLUDED)
    torch.testing.assert_close(largest, expected_max)
    for name, p in net.named_parameters():
        if name in DEFAULT_INCLUDED:
            ref = torch.renorm(before[name], 2, 0, 1.5)
            torch.testing.assert_close(p.detach(), ref, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_apply_on_ddp_wrapped_model(tmp_path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        plain, wrapped_inner = make_net(), make_net()
        wrapped = nn.parallel.DistributedDataParallel(wrapped_inner)
        reg = Regularizer(l1=1e-3, l2=1e-2, per_layer={"fc.weight": (0.0, 0.3)})
        grads_after(plain)
        reg.apply_(plain)
        grads_after(wrapped)
        reg.apply_(wrapped)
        assert [r["name"] for r in reg.report(wrapped)] == [n for n, _ in plain.named_parameters()]
        for (n, p), q in zip(plain.named_parameters(), wrapped_inner.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, msg=n)
        torch.testing.assert_close(reg.penalty(wrapped), reg.penalty(plain))
    finally:
        dist.destroy_process_group()


def test_l1_pieces_on_a_strided_parameter_of_exactly_the_piece_size():
    """A channels-last weight with exactly one piece of elements: the shared buffer keeps
    its shape, so the next (contiguous) parameter still gets the right gradient."""
    from trainwell.regularization.penalties import _piece_elements

    n = _piece_elements()
    conv = nn.Conv2d(n // 4, 1, kernel_size=2, bias=False).to(memory_format=torch.channels_last)
    lin = nn.Linear(100, 512, bias=False)  # one piece, smaller than the buffer
    model = nn.Sequential(conv, lin)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert conv.weight.numel() == n and not conv.weight.is_contiguous()
    reg = Regularizer(l1=0.5, exclude=())
    reg.apply_(model)
    reg.apply_(model)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.sign(p.detach()))  # twice 0.5 * sign(w)
