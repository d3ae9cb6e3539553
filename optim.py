"""
The optimizer: its parameter groups, its construction (ZeRO-1 sharding included) and the step that skips
a non-finite update on device. parallel.py wraps the model; this module builds what steps it.

    optimizer = optim.build_optimizer(model, d, zero1=False, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    optim.set_lr(optimizer, lr)          # every step: the schedule's lr times each group's lr_scale
    optim.step(optimizer, found_inf)     # skipped on device when found_inf (a 0/1 tensor) is set

Parameter groups carry an lr_scale: the loop's schedule sets one learning rate, and each group takes it
times its own scale, so a group's rate keeps its ratio to the others through warmup and decay.

Two optimizers, one object for the loop, the checkpoint, ZeRO-1 and the spectral code:
- adamw: torch's fused AdamW over every trained parameter (the seed presets' recipe).
- muon:  MuonAdamW, an AdamW whose group of kind "muon" (the blocks' 2-D weight matrices) steps with
         Muon: Nesterov momentum, orthogonalised by a quintic Newton-Schulz iteration (torch.optim.Muon's
         coefficients), batched over same-shape matrices. Embeddings, the output head, norms and biases
         stay on AdamW (fused kernel, the same moments, so finetune/spectral.py finds exp_avg as before).

Muon's learning rate. The orthogonalised update O has every singular value near 1, so its RMS is about
1/sqrt(max(A, B)) for an A x B matrix, far from AdamW's ~0.2. adjust_lr="match_rms_adamw" (Moonlight,
"Muon is Scalable for LLM Training") scales the step to lr * 0.2 * sqrt(max(A, B)), which gives the update
AdamW's RMS, so AdamW's learning rate transfers and muon_lr_scale (the Muon group's lr_scale) starts at 1;
adjust_lr="original" (Keller Jordan's) is lr * sqrt(max(1, A / B)) and wants lr ~0.02. Weight decay is
decoupled, p *= 1 - lr * weight_decay, with the unscaled lr, as torch.optim.Muon does.

Layouts. ZeRO-1 shards by whole parameters, so each rank orthogonalises the matrices it owns. Under FSDP2
each rank gathers every Muon matrix's update (an all-gather of the sharded momentum update), orthogonalises
all of them, identically on every rank, and keeps its own rows: the simplest exact choice, which spends
world_size times the Newton-Schulz FLOPs. DistMuon's choice (each rank orthogonalises a share of the
matrices, then an all-gather) saves that compute at scale; on this project's CPU tests it would only add code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from parallel import Dist

OPTIMIZERS = ("adamw", "muon")
ADJUST_LR = ("match_rms_adamw", "original")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic
NS_EPS = 1e-7


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups over the trainable parameters: weight decay on 2-D weights only (not biases, norms)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]


def is_muon_matrix(name: str, p: torch.Tensor) -> bool:
    """A hidden 2-D weight of a block (attention and MLP projections): what Muon steps."""
    return name.startswith("h.") and p.dim() == 2


def muon_params(model: nn.Module) -> int:
    """How many parameters Muon steps (one fp32 momentum buffer each, against AdamW's two moments)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_muon_matrix(n, p))


def muon_param_groups(model: nn.Module, weight_decay: float, muon: MuonSettings, device: torch.device) -> list[dict]:
    """The blocks' 2-D weights in one Muon group; embeddings, head (decayed), norms and biases on AdamW."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_muon_matrix(n, p)]
    rest = [p for n, p in named if not is_muon_matrix(n, p)]
    ns_dtype = "bfloat16" if device.type == "cuda" else "float32"  # CPUs without bf16 matrix units: fp32 is faster
    return [{"params": hidden, "kind": "muon", "weight_decay": weight_decay, "lr_scale": muon.lr_scale,
             "momentum": muon.momentum, "nesterov": True, "ns_steps": muon.ns_steps, "adjust_lr": muon.adjust_lr,
             "ns_dtype": ns_dtype},
            {"params": [p for p in rest if p.dim() >= 2], "kind": "adamw", "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for p in rest if p.dim() < 2], "kind": "adamw", "weight_decay": 0.0, "lr_scale": 1.0}]


@dataclass
class MuonSettings:
    """Muon's keys (TrainConfig's muon_*)."""

    lr_scale: float = 1.0  # the Muon group's lr is the schedule's lr times this
    momentum: float = 0.95
    ns_steps: int = 5  # Newton-Schulz iterations
    adjust_lr: str = "match_rms_adamw"  # one of ADJUST_LR (module docstring)


def build_optimizer(model: nn.Module, d: Dist, *, zero1: bool, lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float = 1e-8, muon: MuonSettings | None = None) -> torch.optim.Optimizer:
    """AdamW, torch's fused kernel on GPU and CPU, over param_groups(model); with muon, MuonAdamW over
    muon_param_groups(model). ZeRO-1 shards its state by whole parameters.

    On CPU the fused kernel is 3-5x faster than torch's default per-tensor loop (torch 2.13, 2 cores:
    1.2 vs 5.8 ms per step at the quickstart's 0.8M parameters, 49 vs 241 ms for 4 layers at width 1024).
    """
    kwargs = dict(lr=lr, betas=betas, eps=eps, fused=d.device.type in ("cuda", "cpu"))
    if muon is None:
        cls, groups = torch.optim.AdamW, param_groups(model, weight_decay)
    else:
        cls, groups = MuonAdamW, muon_param_groups(model, weight_decay, muon, d.device)
    if zero1 and d.world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, **kwargs)
    return cls(groups, **kwargs)


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps this rank's parameters (ZeRO-1 wraps one)."""
    return getattr(opt, "optim", opt)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for this step, times each group's lr_scale (1 for a group without one: a checkpoint
    saved before groups had scales)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def step(opt: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Step unless found_inf (a 0/1 tensor, equal on every rank) is set.

    The fused AdamW reads found_inf on device and skips there, with no host sync; any other reads the
    flag and skips in Python.
    """
    inner = local_optimizer(opt)
    if inner.defaults.get("fused"):
        inner.found_inf = found_inf
        opt.step()
    elif not found_inf.item():
        opt.step()


# -- Muon ----------------------------------------------------------------------------------------------


def orthogonalize(G: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of a batch of matrices G (n, A, B): about U V^T of each (singular
    values in roughly [0.7, 1.2], not exactly 1: the quintic trades exactness for speed), in dtype.
    torch.optim.Muon's iteration, run on the whole batch at once in dtype."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # (n, B, A): the Gram matrix X X^T is the smaller side, min(A, B)^2
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = X @ X.mT  # (n, m, m), m = min(A, B)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram^2
        X = torch.baddbmm(X, poly, X, beta=a)  # a * X + poly @ X
    return X.mT if tall else X


def adjusted_lr(lr: float, adjust_lr: str, shape: torch.Size) -> float:
    """The step size of an orthogonalised update of a shape (A, B) matrix (module docstring)."""
    A, B = shape[0], shape[1]
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(A, B))
    return lr * math.sqrt(max(1.0, A / B))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class MuonAdamW(torch.optim.AdamW):
    """AdamW (fused where it can be) for groups of kind "adamw"; Muon for the group of kind "muon".

    A Muon parameter's state is one fp32 momentum_buffer (torch.optim.Muon's key); an AdamW parameter's is
    AdamW's own. One class, so ZeroRedundancyOptimizer (which takes one optimizer class) can shard it.
    found_inf (set by optim.step, as GradScaler does) skips both halves on device, with no host sync.
    """

    OWN_KEYS = ("kind", "lr_scale", "momentum", "nesterov", "ns_steps", "adjust_lr", "ns_dtype")

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonAdamW takes no closure"
        found_inf = getattr(self, "found_inf", None)
        groups = self.param_groups
        try:  # AdamW's own step over its groups only
            self.param_groups = [g for g in groups if g.get("kind") != "muon"]
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("kind") == "muon":
                self._muon_step(group, found_inf)

    def _muon_step(self, group: dict, found_inf: torch.Tensor | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        grads = [_local(p.grad) for p in params]
        new_bufs = [_local(b).lerp(g, 1 - mu) for b, g in zip(bufs, grads)]  # B = mu B + (1 - mu) g
        updates = [g.lerp(b, mu) for g, b in zip(grads, new_bufs)] if group["nesterov"] else new_bufs
        ortho = self._orthogonalize_all(params, updates, group["ns_steps"], getattr(torch, group["ns_dtype"]))
        skip = None if found_inf is None else found_inf.bool()
        for p, buf, new_buf, o in zip(params, bufs, new_bufs, ortho):
            local_p = _local(p)
            new_p = local_p * (1 - lr * wd)  # decoupled weight decay with the unscaled lr, as torch.optim.Muon
            new_p.add_(o.to(local_p.dtype), alpha=-adjusted_lr(lr, group["adjust_lr"], p.shape))
            if skip is None:
                local_p.copy_(new_p)
                _local(buf).copy_(new_buf)
            else:  # on device: a skipped step keeps the weights and the momentum as they were
                local_p.copy_(torch.where(skip, local_p, new_p))
                _local(buf).copy_(torch.where(skip, _local(buf), new_buf))

    @staticmethod
    def _orthogonalize_all(params: list[torch.Tensor], updates: list[torch.Tensor], steps: int,
                           dtype: torch.dtype) -> list[torch.Tensor]:
        """Each update orthogonalised as a whole matrix, same shapes batched together; under FSDP2 the
        shards are gathered first and each rank keeps its own rows of the result."""
        full = []
        for p, u in zip(params, updates):
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                u = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            full.append(u)
        by_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(full):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(full)
        for idx in by_shape.values():
            for i, o in zip(idx, orthogonalize(torch.stack([full[i] for i in idx]), steps, dtype)):
                out[i] = o
        for i, p in enumerate(params):
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                out[i] = distribute_tensor(out[i], p.device_mesh, p.placements, src_data_rank=None).to_local()
        return out

    def __setstate__(self, state: dict) -> None:
        """AdamW's upgrade of old state (a tensor step) for its own groups; a Muon buffer has no step."""
        groups = state["param_groups"]
        super().__setstate__(dict(state, param_groups=[g for g in groups if g.get("kind") != "muon"]))
        self.param_groups = groups

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved moments and AdamW's saved hyperparameters (torch's rule); this run's Muon settings and lr
        scales (so a resume can change muon_lr_scale, and a CPU checkpoint resumed on a GPU uses bf16)."""
        mine = [{k: g[k] for k in self.OWN_KEYS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, mine):
            group.update(keys)
