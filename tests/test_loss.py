"""The fused output-head loss (loss.linear_cross_entropy): each variant against F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt

import model
from loss import LOSS_VARIANTS, linear_cross_entropy
from model import GPT


def _inputs(dtype: torch.dtype, N: int = 90, d: int = 24, V: int = 70) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, d, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -1  # ignored positions
    return x, w, t


def _loss_and_grads(fn, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _reference(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, w.to(x.dtype)).float() if x.dtype != torch.float64 else F.linear(x, w), t,
                           ignore_index=-1)


# The fused loss computes its logits in fp32 (an fp64 input is cast down), so fp32 inputs are
# compared with an fp64 reference on the same values: measured loss difference up to 4e-7.
@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_each_variant_matches_reference_with_chunks_and_ignored_targets(variant):
    x, w, t = _inputs(torch.float32)
    ours = _loss_and_grads(lambda x, w, t: linear_cross_entropy(x, w, t, 31, variant), x, w, t)
    ref = _loss_and_grads(_reference, x.double(), w.double(), t)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)
    assert ours[1][::7].abs().max() == 0  # ignored rows get no input gradient


def _check_bf16(fn, variant: str) -> None:
    """fn(x, w, t, variant) under bf16 autocast against an fp64 reference on the same bf16-rounded operands
    (what the fused loss sees). Measured (2026-12-07, torch 2.13.0+cpu), the worst variant: loss within
    6.4e-6, input gradient within 5.8e-5 and head gradient within 9.5e-5 (the gradients are up to 1.2e-2 and
    3.2e-2: g is rounded to bf16 before its matmuls). Allowed 2x: 1.3e-5, 1.2e-4, 1.9e-4, tight enough that
    the planted bugs below (a 3% input-gradient or a 1% head-gradient error: 3.9e-4 and 3.7e-4) fail."""
    x, w, t = _inputs(torch.float32)
    ref = _loss_and_grads(lambda x, w, t: F.cross_entropy(F.linear(x, w), t, ignore_index=-1),
                          x.bfloat16().double(), w.bfloat16().double(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(lambda x, w, t: fn(x.bfloat16(), w, t, variant), x, w, t)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    assert abs(ours[0].double() - ref[0]) < 1.3e-5
    assert (ours[1].double() - ref[1]).abs().max() < 1.2e-4
    assert (ours[2].double() - ref[2]).abs().max() < 1.9e-4


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_each_variant_under_bf16_autocast_is_close_to_the_reference(variant):
    _check_bf16(lambda x, w, t, v: linear_cross_entropy(x, w, t, 31, v), variant)


class _Scaled(torch.autograd.Function):
    """Identity forward, gradient times a factor: a planted bug."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
@pytest.mark.parametrize("bug", ["ignored positions counted", "loss x 1.00005", "input gradient x 1.03",
                                 "input gradient x 0.97", "head gradient x 1.01", "head gradient x 0.99"])
def test_the_bf16_check_catches_planted_bugs(bug, variant):
    """The tolerances above fail, for every variant, a loss that averages over ignored positions too or is off
    by 5e-5 of itself, a 3% error in the input gradient and a 1% error in the head gradient."""
    factor = float(bug.rsplit(" ", 1)[1]) if " x " in bug else 1.0

    def planted(x, w, t, variant):
        if bug == "ignored positions counted":
            n_valid, n = (t != -1).sum(), t.numel()
            return linear_cross_entropy(x, w, t, 31, variant) * n_valid / n
        if bug.startswith("loss"):
            return linear_cross_entropy(x, w, t, 31, variant) * factor
        if bug.startswith("input"):
            return linear_cross_entropy(_Scaled.apply(x, factor), w, t, 31, variant)
        return linear_cross_entropy(x, _Scaled.apply(w, factor), t, 31, variant)

    with pytest.raises(AssertionError):
        _check_bf16(planted, variant)


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_frozen_head_or_input_gets_no_gradient_and_the_other_is_unchanged(variant):
    x, w, t = _inputs(torch.float32)
    _, gx_ref, gw_ref = _loss_and_grads(_reference, x, w, t)
    xf, wf = x.clone().requires_grad_(), w.clone()  # frozen head
    linear_cross_entropy(xf, wf, t, 31, variant).backward()
    assert wf.grad is None
    torch.testing.assert_close(xf.grad, gx_ref, atol=1e-6, rtol=1e-6)
    xf, wf = x.clone(), w.clone().requires_grad_()  # frozen input
    linear_cross_entropy(xf, wf, t, 31, variant).backward()
    assert xf.grad is None
    torch.testing.assert_close(wf.grad, gw_ref, atol=1e-6, rtol=1e-6)


def _tiny() -> GPT:
    torch.manual_seed(0)
    return tiny_gpt(block_size=64)


@pytest.mark.parametrize("tokens,fused", [(16, False), (64, True)])
def test_small_logits_take_f_cross_entropy_by_size_with_equal_results(monkeypatch, tokens, fused):
    m = _tiny()
    m.loss_chunk = 128  # F.cross_entropy at <= 32 tokens, the fused loss above
    idx, tgt = torch.randint(0, 64, (1, tokens)), torch.randint(0, 64, (1, tokens))
    calls = []
    real = linear_cross_entropy
    # patched where model.py's head looks it up (it imports the name from loss.py)
    monkeypatch.setattr(model, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    _, loss = m(idx, tgt)
    assert bool(calls) == fused
    logits, _ = m(idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 64), tgt.view(-1)), atol=1e-6, rtol=1e-6)


def test_flops_per_token_counts_frozen_weights_at_four():
    m = _tiny()
    T = 32
    trainable = m.flops_per_token(T)
    head = m.wte.weight if m.lm_head is None else m.lm_head.weight
    frozen = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)] + [head]
    for p in m.parameters():
        p.requires_grad_(False)
    # by hand: each matmul weight drops from 6 to 4 FLOPs per parameter, attention is unchanged
    assert m.flops_per_token(T) == trainable - 2 * sum(w.numel() for w in {id(w): w for w in frozen}.values())


@pytest.mark.parametrize("variant", LOSS_VARIANTS)
def test_multi_chunk_autocast_loss_compiles_in_one_graph(variant):
    import torch._dynamo

    x, w, t = _inputs(torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(lambda x, w, t: linear_cross_entropy(x.bfloat16(), w, t, 31, variant))(
            x, w, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
