"""
Spectral refactoring of LoRA factors (the SpectralRefactorTrainer of the Llama-3.1 LoRA guide this folder reproduces), every refactor_every steps.

For one adapter (A: (r, in), B: (out, r)) in fp32:
    B = Qb Rb, A^T = Qa Ra (thin QR), core Rb Ra^T = U diag(S) V^T (r x r SVD), so B A = (Qb U) S (Qa V)^T
and the factors are written back balanced: B' = Qb U sqrt(S~), A' = sqrt(S~) V^T Qa^T, with
- exact:    S~ = S. The product B A, hence the model, is unchanged; B'^T B' = A' A'^T = diag(S).
- balanced: S~ = (1 - lam) S + lam mean(S) (lam = 0.85 in the guide). This CHANGES the function on
            purpose: it flattens the adapter's spectrum toward its mean.
- clamp:    S~ = min(S, bound / scaling), so the spectral norm of scaling * B' A' is at most bound.
- delta:    balanced, applied only to what training added: D = B A - B0 A0 against the initial factors
            (PiSSA's B0 A0 is the base weight's top-r singular directions), its spectrum flattened by lam
            as above, and B' A' the best rank-r approximation of B0 A0 + D~. balanced instead flattens
            B A itself, so with PiSSA it rewrites the base's principal components (measured in
            finetune/README.md).
Adapters with an all-zero factor (B at a default init) are skipped: their product has no spectrum.

Optimizer state (torch.optim.Adam/AdamW moments of the LoRA parameters):
- reset (default): exp_avg and exp_avg_sq zeroed and step set to 0; the caller re-warms the LR over a
  few steps. It is the only policy whose next update is well-defined in every mode: the second
  moment is per coordinate and does not transform with a change of basis, so after a refactor any
  kept exp_avg_sq describes the old coordinates, and Adam's m / sqrt(v) mixes two bases.
- map_first_moment: the first moment is mapped as a gradient is under the reparametrisation
  B' = B X, A' = Z A (chain rule: m_B' = m_B X^-T = m_B Rb^T U / sqrt(S~), m_A' = Z^-T m_A =
  diag(1/sqrt(S~)) V^T Ra m_A); exp_avg_sq and step are kept. For `exact` it is exactly the gradient
  map. This is the guide's trainer's behaviour.
- keep: the state is left as is (moments in the old basis).

refactor_factors() is the pure per-adapter math on full tensors, spectral_refactor() applies it to every
adapter of one model, and refactor() on every parallel layout: under DDP and ZeRO-1 every rank runs it on
its full copy and rank 0's result is broadcast, under FSDP each factor is gathered, refactored and
redistributed. refactor_hooks() returns the after-step hook that runs it at the scheduled steps, as
fp8.convert returns its hooks, for loop.Loop.after_step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import optim
import parallel

MODES = ("balanced", "exact", "clamp", "delta")
OPT_STATES = ("reset", "map_first_moment", "keep")


def check_args(mode: str, lam: float, bound: float | None, opt_state: str) -> None:
    if mode not in MODES:
        raise ValueError(f"refactor mode={mode!r} must be one of {', '.join(MODES)}")
    if opt_state not in OPT_STATES:
        raise ValueError(f"refactor opt_state={opt_state!r} must be one of {', '.join(OPT_STATES)}")
    if mode == "delta" and opt_state == "map_first_moment":
        raise ValueError("refactor mode=delta is not a change of basis of the factors, so their first moments "
                         "have no map; use opt_state reset or keep")
    if mode in ("balanced", "delta") and not 0.0 <= lam <= 1.0:
        raise ValueError(f"refactor lam={lam!r} must be in [0, 1]")
    if mode == "clamp" and (bound is None or not bound > 0):
        raise ValueError(
            f"refactor mode=clamp needs a bound > 0 on the spectral norm of scaling * B A, got {bound!r}"
        )


@torch.no_grad()
def refactor_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scaling: float,
    mode: str,
    lam: float = 0.85,
    bound: float | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """New fp32 factors (A', B') of one adapter, and what map_moments needs (Rb, Ra, U, Vh, root, S).

    init: the adapter's initial factors (A0, B0), which mode delta measures the update against."""
    check_args(mode, lam, bound, "keep")
    A32, B32 = A.detach().float(), B.detach().float()
    if mode == "delta":
        return _refactor_delta(A32, B32, init, lam)
    Qb, Rb = torch.linalg.qr(B32)  # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A32.t())  # (in, r), (r, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t())  # core (r, r): B A = Qb U diag(S) Vh Qa^T
    if mode == "exact":
        St = S
    elif mode == "balanced":
        St = (1 - lam) * S + lam * S.mean()
    else:
        St = S.clamp(max=bound / scaling)
    root = St.sqrt()  # (r,)
    B_new = (Qb @ U) * root  # (out, r)
    A_new = root[:, None] * (Vh @ Qa.t())  # (r, in)
    return A_new, B_new, {"Rb": Rb, "Ra": Ra, "U": U, "Vh": Vh, "root": root, "S": S, "S_new": St}


def _thin_svd(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P Q = L diag(S) R, with L (out, k) and R (k, in) orthonormal, from thin QRs and a (k, k) SVD."""
    Qp, Rp = torch.linalg.qr(P)  # (out, k), (k, k)
    Qq, Rq = torch.linalg.qr(Q.t())  # (in, k), (k, k)
    U, S, Vh = torch.linalg.svd(Rp @ Rq.t())
    return Qp @ U, S, Vh @ Qq.t()


def _refactor_delta(A: torch.Tensor, B: torch.Tensor, init: tuple[torch.Tensor, torch.Tensor] | None,
                    lam: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Mode delta: flatten the spectrum of D = B A - B0 A0 only, then the best rank-r factors of B0 A0 + D~."""
    if init is None:
        raise ValueError("refactor mode=delta needs the adapter's initial factors")
    A0, B0 = (t.detach().float() for t in init)
    r = A.size(0)
    L, S, R = _thin_svd(torch.cat([B, -B0], 1), torch.cat([A, A0], 0))  # D = L diag(S) R, rank <= 2r
    live = S > S.max() * 1e-6  # the update's real directions (it may be rank-deficient, e.g. at init)
    S_flat = torch.where(live, (1 - lam) * S + lam * S[live].mean(), S) if live.any() else S
    L2, S2, R2 = _thin_svd(torch.cat([B0, L * S_flat], 1), torch.cat([A0, R], 0))  # B0 A0 + D~, rank <= 3r
    root = S2[:r].sqrt()
    return root[:, None] * R2[:r], L2[:, :r] * root, {"S": _thin_svd(B, A)[1], "S_new": S2[:r]}


def map_moments(
    m_A: torch.Tensor, m_B: torch.Tensor, basis: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """First moments (gradient-like) of A and B mapped into the new factors' basis (fp32)."""
    # a singular value of exactly zero has no direction to map; guard the division
    inv = 1.0 / basis["root"].clamp(min=torch.finfo(torch.float32).tiny ** 0.5)
    new_B = (m_B.float() @ basis["Rb"].t() @ basis["U"]) * inv  # (out, r)
    new_A = inv[:, None] * (basis["Vh"] @ basis["Ra"] @ m_A.float())  # (r, in)
    return new_A, new_B


def reset_moments(state: dict) -> None:
    """The reset policy on one parameter's AdamW state: moments zeroed and step set to 0, in place."""
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].zero_()
    if "step" in state:
        state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


@torch.no_grad()
def spectral_refactor(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    mode: str,
    lam: float = 0.85,
    bound: float | None = None,
    opt_state: str = "reset",
) -> dict:
    """Refactor every adapter of model in place and apply the optimizer-state policy; returns stats.

    Stats: adapters (refactored), skipped (a zero factor), sv_max_before/after (of scaling * B A).
    """
    check_args(mode, lam, bound, opt_state)
    state = optimizer.state if optimizer is not None else {}
    n = skipped = 0
    sv_before = sv_after = 0.0
    from finetune.lora import lora_modules  # here: config.py imports this module for check_args alone

    for _, m in lora_modules(model):
        for name in m.names:
            A, B = m.lora_A[name], m.lora_B[name]
            if not A.any() or not B.any():
                skipped += 1
                continue
            A_new, B_new, basis = refactor_factors(A, B, scaling=m.scaling, mode=mode, lam=lam, bound=bound,
                                                   init=m.init_factors.get(name))
            sv_before = max(sv_before, m.scaling * float(basis["S"][0]))
            sv_after = max(sv_after, m.scaling * float(basis["S_new"].max()))
            sA, sB = state.get(A, {}), state.get(B, {})
            if opt_state == "map_first_moment" and "exp_avg" in sA and "exp_avg" in sB:
                mA, mB = map_moments(sA["exp_avg"], sB["exp_avg"], basis)
                sA["exp_avg"].copy_(mA)
                sB["exp_avg"].copy_(mB)
            elif opt_state == "reset":
                reset_moments(sA)
                reset_moments(sB)
            A.copy_(A_new)
            B.copy_(B_new)
            n += 1
    return {"adapters": n, "skipped": skipped, "sv_max_before": sv_before, "sv_max_after": sv_after}


def refactor_steps(every: int, start: int | None, total: int, warmup: int) -> list[int]:
    """Optimizer steps after which the factors are refactored: every `every` from start (default: the warmup)."""
    start = warmup if start is None else start
    return [s for s in range(every, total, every) if s >= max(1, start)]


def rewarm_steps(opt_state: str, rewarm: int) -> int:
    """Steps over which the LR ramps up again after a refactor: `rewarm` after a reset (Adam restarts without
    moments, so its first updates are full-size), 0 when the moments are kept or mapped."""
    return rewarm if opt_state == "reset" else 0


@torch.no_grad()
def refactor(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: parallel.Layout, d: parallel.Dist,
             *, mode: str, lam: float, bound: float | None, opt_state: str) -> dict:
    """spectral_refactor with identical factors on every rank.

    Replicated adapters (single, DDP, ZeRO-1): every rank holds the full factors; each refactors them, then
    rank 0's result is broadcast (bitwise identical ranks whatever the SVD kernel does). ZeRO-1 applies the
    optimizer policy to the moments this rank owns. Sharded parameters (FSDP): each factor is gathered,
    refactored in full on every rank and redistributed to the shards; the moments are reset (or kept) shard
    by shard.
    """
    kw = dict(mode=mode, lam=lam, bound=bound)
    if not layout.shard_params:
        stats = spectral_refactor(model, optim.local_optimizer(optimizer), opt_state=opt_state, **kw)
        if d.world_size > 1:
            import torch.distributed as dist

            for p in (p for p in model.parameters() if p.requires_grad):
                dist.broadcast(p.data, src=0)
        return stats | {"ranks_identical": ranks_identical(model, d)}
    from torch.distributed.tensor import distribute_tensor

    from finetune.lora import lora_modules

    n = skipped = 0
    for _, m in lora_modules(model):
        for name in m.names:
            A, B = m.lora_A[name], m.lora_B[name]
            full_A, full_B = parallel.full_tensor(A.data), parallel.full_tensor(B.data)  # collective, same order everywhere
            if not full_A.any() or not full_B.any():
                skipped += 1
                continue
            new_A, new_B, _ = refactor_factors(full_A, full_B, scaling=m.scaling, init=m.init_factors.get(name), **kw)
            for p, new in ((A, new_A), (B, new_B)):
                p.data.copy_(distribute_tensor(new.to(p.dtype), p.device_mesh, p.placements))
                if opt_state == "reset":
                    reset_moments(optimizer.state.get(p, {}))
            n += 1
    return {"adapters": n, "skipped": skipped, "ranks_identical": ranks_identical(model, d)}


@torch.no_grad()
def ranks_identical(model: torch.nn.Module, d: parallel.Dist) -> bool:
    """Whether every rank holds bitwise the same full adapters (a collective; FSDP gathers them)."""
    if d.world_size == 1:
        return True
    import torch.distributed as dist

    from finetune.lora import lora_parameters

    flat = torch.cat([parallel.full_tensor(p.data).flatten().double() for p in lora_parameters(model)])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def refactor_hooks(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: parallel.Layout,
                   d: parallel.Dist, steps: list[int], record: Callable[[dict], None], *, mode: str, lam: float,
                   bound: float | None, opt_state: str) -> list[Callable]:
    """The after-step hooks (loop.Loop.after_step) of a spectral-refactor run: refactor() after each of steps,
    each refactor's stats passed to record (the run log's event); none when steps is empty."""
    if not steps:
        return []

    def after_step(run) -> None:
        if run.iter_num in steps:
            stats = refactor(model, optimizer, layout, d, mode=mode, lam=lam, bound=bound, opt_state=opt_state)
            record({"iter": run.iter_num, "event": "spectral_refactor", "mode": mode, **stats})

    return [after_step]
