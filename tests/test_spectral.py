"""finetune/spectral.py: the three modes against independent SVDs of B A, and the optimizer-state policies."""

import pytest
import torch
from conftest import LLAMA_FEATURES, tiny_gpt

from finetune.lora import LoRAConfig, apply_lora, lora_modules, lora_parameters
from finetune.spectral import map_moments, refactor_factors, spectral_refactor
from model import GPT


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = tiny_gpt(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                     tie_embeddings=False, **LLAMA_FEATURES)
    apply_lora(
        model,
        LoRAConfig(r=4, alpha=8, init="pissa", target_modules=("q_proj", "v_proj", "up_proj", "o_proj")),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking adapter: unbalanced, well away from init
        for p in lora_parameters(model):
            p.mul_(1 + torch.rand(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _adapters(model: GPT):
    return [(m, n) for _, m in lora_modules(model) for n in m.names]


def _idx(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_exact_keeps_function_and_spectrum_and_balances():
    model = _model()
    before = [(m.scaling * m.lora_B[n] @ m.lora_A[n]).detach().clone() for m, n in _adapters(model)]
    with torch.no_grad():
        logits = model(_idx())[0]
    stats = spectral_refactor(model, None, mode="exact")
    assert stats["adapters"] == len(before) == 8 and stats["skipped"] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(_idx())[0], logits, atol=1e-6, rtol=0)
    for (m, n), p in zip(_adapters(model), before, strict=True):
        A, B = m.lora_A[n].detach(), m.lora_B[n].detach()
        S = torch.linalg.svdvals(p / m.scaling)[: m.r]
        torch.testing.assert_close(torch.linalg.svdvals(B @ A)[: m.r], S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(B.t() @ B, torch.diag(S), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(A @ A.t(), torch.diag(S), atol=1e-5, rtol=1e-5)
    assert abs(stats["sv_max_before"] - stats["sv_max_after"]) < 1e-5


def test_balanced_matches_formula():
    model = _model(1)
    lam = 0.85
    targets = []
    for m, n in _adapters(model):
        S = torch.linalg.svdvals(m.lora_B[n].detach() @ m.lora_A[n].detach())[: m.r]
        targets.append((1 - lam) * S + lam * S.mean())
    spectral_refactor(model, None, mode="balanced", lam=lam)
    for (m, n), St in zip(_adapters(model), targets, strict=True):
        A, B = m.lora_A[n].detach(), m.lora_B[n].detach()
        torch.testing.assert_close(torch.linalg.svdvals(B @ A)[: m.r], St, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(B.t() @ B, torch.diag(St), atol=1e-5, rtol=1e-5)


def test_clamp_respects_bound_and_leaves_small_values():
    model = _model(2)
    sv = [
        m.scaling * torch.linalg.svdvals(m.lora_B[n].detach() @ m.lora_A[n].detach())[: m.r]
        for m, n in _adapters(model)
    ]
    bound = float(torch.cat(sv).median())
    stats = spectral_refactor(model, None, mode="clamp", bound=bound)
    assert stats["sv_max_before"] > bound >= stats["sv_max_after"] - 1e-6
    for (m, n), s in zip(_adapters(model), sv, strict=True):
        new = m.scaling * torch.linalg.svdvals(m.lora_B[n].detach() @ m.lora_A[n].detach())[: m.r]
        assert float(torch.linalg.matrix_norm(m.scaling * m.lora_B[n] @ m.lora_A[n], ord=2)) <= bound * (
            1 + 1e-5
        )
        torch.testing.assert_close(new, s.clamp(max=bound), atol=1e-5, rtol=1e-5)


def test_zero_factor_is_skipped():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(r=2))  # default init: B = 0
    A0 = [p.clone() for p in lora_parameters(model)]
    stats = spectral_refactor(model, None, mode="exact")
    assert stats["adapters"] == 0 and stats["skipped"] == 6
    assert all(torch.equal(a, p) for a, p in zip(A0, lora_parameters(model), strict=True))


def test_first_moment_map_is_the_gradient_map():
    """In exact mode, the mapped gradient of the old factors is the gradient at the new factors."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 10, generator=g).requires_grad_()
    B = torch.randn(7, 3, generator=g).requires_grad_()
    x, w = torch.randn(5, 10, generator=g), torch.randn(5, 7, generator=g)

    def loss(a, b):
        return ((x @ a.t() @ b.t()).tanh() * w).sum()

    gA, gB = torch.autograd.grad(loss(A, B), [A, B])
    A_new, B_new, basis = refactor_factors(A, B, scaling=1.0, mode="exact")
    A_new.requires_grad_()
    B_new.requires_grad_()
    gA_new, gB_new = torch.autograd.grad(loss(A_new, B_new), [A_new, B_new])
    mA, mB = map_moments(gA, gB, basis)
    torch.testing.assert_close(mA, gA_new, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mB, gB_new, atol=1e-5, rtol=1e-5)


def _stepped(seed: int = 3):
    model = _model(seed)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
    _, loss = model(_idx(), _idx(1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("policy", ["reset", "map_first_moment", "keep"])
def test_optimizer_state_policies(policy):
    model, opt = _stepped()
    old = {
        p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in opt.state
    }
    before = {p: p.detach().clone() for p in lora_parameters(model)}
    spectral_refactor(model, opt, mode="balanced", lam=0.5, opt_state=policy)
    # The first moment transforms like a gradient under B' = B X, A' = Z A (X, Z invertible r x r):
    # m_B' = m_B X^-T and m_A' = Z^-T m_A. X and Z are solved here from the factors themselves, by least
    # squares, independently of what refactor_factors and map_moments compute internally.
    expected = {}
    for m, n in _adapters(model):
        A, B = m.lora_A[n], m.lora_B[n]
        X = torch.linalg.lstsq(before[B].double(), B.detach().double()).solution  # B' = B X
        Z = torch.linalg.lstsq(before[A].double().t(), A.detach().double().t()).solution.t()  # A' = Z A
        expected[B] = (old[B]["exp_avg"].double() @ torch.linalg.inv(X).t()).float()
        expected[A] = (torch.linalg.inv(Z).t() @ old[A]["exp_avg"].double()).float()
    for p, s in opt.state.items():
        if policy == "reset":
            assert not s["exp_avg"].any() and not s["exp_avg_sq"].any() and float(s["step"]) == 0
        elif policy == "keep":
            assert all(torch.equal(s[k], old[p][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
        else:
            torch.testing.assert_close(s["exp_avg"], expected[p], atol=1e-5, rtol=1e-4)
            assert not torch.equal(s["exp_avg"], old[p]["exp_avg"])
            assert torch.equal(s["exp_avg_sq"], old[p]["exp_avg_sq"]) and torch.equal(
                s["step"], old[p]["step"]
            )
    _, loss = model(_idx(), _idx(1))  # the optimizer still steps after the refactor
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in lora_parameters(model))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="svd"),
        dict(mode="clamp"),
        dict(mode="clamp", bound=-1.0),
        dict(mode="balanced", lam=1.5),
        dict(mode="exact", opt_state="zero"),
    ],
)
def test_bad_arguments_raise_one_line(kwargs):
    with pytest.raises(ValueError) as e:
        spectral_refactor(_model(), None, **kwargs)
    assert "\n" not in str(e.value)


def test_delta_flattens_only_the_update_against_an_independent_full_svd():
    """mode delta on a PiSSA model that has trained: B'A' is the best rank-r approximation of
    B0A0 + flatten(BA - B0A0), recomputed here with full SVDs of the (out, in) matrices; at lam=0, or at the
    initial factors, it changes nothing (balanced would flatten B0A0, the base's principal part, there too)."""
    model, _ = _stepped()
    lam = 0.85
    for m, n in _adapters(model):
        A, B = m.lora_A[n].detach(), m.lora_B[n].detach()
        A0, B0 = m.init_factors[n]
        M, M0, r = (B @ A).double(), (B0 @ A0).double(), A.size(0)
        U, S, Vh = torch.linalg.svd(M - M0, full_matrices=False)
        live = S > S.max() * 1e-6
        S_flat = torch.where(live, (1 - lam) * S + lam * S[live].mean(), S)
        U2, S2, Vh2 = torch.linalg.svd(M0 + U @ torch.diag(S_flat) @ Vh, full_matrices=False)
        want = U2[:, :r] @ torch.diag(S2[:r]) @ Vh2[:r]
        A_new, B_new, _ = refactor_factors(A, B, scaling=m.scaling, mode="delta", lam=lam, init=(A0, B0))
        torch.testing.assert_close((B_new @ A_new).double(), want, atol=1e-5, rtol=1e-4)
        A_0, B_0, _ = refactor_factors(A, B, scaling=m.scaling, mode="delta", lam=0.0, init=(A0, B0))
        torch.testing.assert_close(B_0 @ A_0, B @ A, atol=1e-5, rtol=1e-4)
        A_i, B_i, _ = refactor_factors(A0, B0, scaling=m.scaling, mode="delta", lam=lam, init=(A0, B0))
        torch.testing.assert_close(B_i @ A_i, B0 @ A0, atol=1e-5, rtol=1e-4)
