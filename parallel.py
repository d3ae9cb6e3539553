"""
Everything distributed: process-group setup from torchrun's variables, and the wrapping of the
raw model for training (torch.compile, DDP, ZeRO-1, FSDP2). model.py never imports this module;
a single process is world size 1 and goes through the same calls.

- DDP:    train_model = torch.compile(DDP(model)), the order PyTorch recommends: compile's
          DDPOptimizer splits the graph at bucket boundaries so all-reduces overlap the backward.
          Gradient sync only on the last micro-step.
- ZeRO-1: DDP as above, with torch's ZeroRedundancyOptimizer sharding the AdamW state.
- FSDP2:  (torchtitan's order) each block is compiled in place, then fully_shard per block, then the root; bf16
          parameters with fp32 gradient reduction on GPU.
- compile_mode="blocks" (any of the above): each Block and the head/loss are compiled in place, and
          DDP (if any) wraps the result; compile_mode="model" compiles the whole (DDP-wrapped) model.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import UserError


class LaunchError(UserError):
    """A device or launch setting that cannot work here; one line naming the fix."""


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:local_rank when a GPU is present, else cpu."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LaunchError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LaunchError(f"device={device!r} but CUDA is not available; use --device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise LaunchError(f"device={device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(0, 0, 1, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world_size, dev)


@dataclass(frozen=True)
class Layout:
    """How a run lays training out over its data-parallel ranks, built once at launch (layout()). Checkpoint,
    fine-tuning and spectral code ask it questions (is the optimizer state sharded? are the parameters?)
    instead of comparing mode strings; `name` is the word checkpoints record ('single', 'ddp', 'zero1', 'fsdp')."""

    dp_rank: int
    dp_size: int
    shard_optimizer: bool = False  # ZeRO-1: each rank holds (and saves) its part of the AdamW state
    shard_params: bool = False  # FSDP2: parameters, gradients and optimizer state are DTensor shards

    @property
    def is_master(self) -> bool:
        return self.dp_rank == 0

    @property
    def per_rank_optimizer_state(self) -> bool:
        """Whether each rank holds a different part of the optimizer state (ZeRO-1, FSDP)."""
        return self.shard_optimizer or self.shard_params

    @property
    def name(self) -> str:
        if self.shard_params:
            return "fsdp"
        if self.dp_size > 1:
            return "zero1" if self.shard_optimizer else "ddp"
        return "single"

    @classmethod
    def saved(cls, name: str | None, world_size: int | None) -> Layout | None:
        """The layout a checkpoint recorded (its name and world size); None for a name it cannot be."""
        flags = {"single": (False, False), "ddp": (False, False), "zero1": (True, False), "fsdp": (False, True)}
        if name not in flags:
            return None
        return cls(0, world_size or 1, *flags[name])

    def same_sharding(self, other: Layout) -> bool:
        """Whether other shards the optimizer state and the parameters as this layout does (single and DDP
        both keep one full copy)."""
        return (other.shard_optimizer, other.shard_params) == (self.shard_optimizer, self.shard_params)


def layout(d: Dist, *, zero1: bool, fsdp: bool) -> Layout:
    """The run's layout: FSDP when asked; ZeRO-1 only over several processes (over one it is plain AdamW)."""
    return Layout(d.rank, d.world_size, shard_optimizer=zero1 and d.world_size > 1 and not fsdp, shard_params=fsdp)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of t over ranks (in place for world size > 1)."""
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of t over ranks (in place for world size > 1)."""
    if d.world_size > 1:
        all_reduce_sum(t, d).div_(d.world_size)
    return t


def on_master(fn, d: Dist):
    """fn() on rank 0 only; its result there (None elsewhere). A UserError it raises is raised on every
    rank, so none is left waiting for rank 0 in a collective."""
    failure, result = None, None
    if d.is_master:
        try:
            result = fn()
        except UserError as e:
            failure = e
    if d.world_size > 1 and all_reduce_max(torch.tensor(float(failure is not None), device=d.device), d).item():
        raise failure or UserError("rank 0 stopped the run; its error says why")
    if failure is not None:
        raise failure
    return result


def all_reduce_max(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def wrap(model: nn.Module, d: Dist, *, fsdp: bool, compile: bool, cuda_graphs: bool, dtype: torch.dtype,
         compile_mode: str = "model", activation_checkpointing: bool = False) -> nn.Module:
    """The module to train. `model` stays the raw module (FSDP shards it in place; "blocks" compiles in place).

    activation_checkpointing: each Block keeps only its input for backward and recomputes the rest there
    (non-reentrant torch.utils.checkpoint), applied first, as torchtitan orders it: AC, compile, FSDP.

    compile_mode "model": one graph for the whole forward (around DDP when world size > 1).
    compile_mode "blocks": each Block compiled in place, plus the head and loss compiled apart
    (torchtitan's structure): one block's graph is compiled once and reused by every layer, so an
    18-layer model compiles about as fast as a 1-layer one. FSDP always compiles per block.
    """
    if activation_checkpointing:
        checkpoint_blocks(model)
    compile_kwargs = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if compile and (fsdp or compile_mode == "blocks"):
        for block in model.h:
            block.compile(**compile_kwargs)
        model.head = torch.compile(model.head, **compile_kwargs)  # an instance attribute shadows the method
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world_size,))
        mp = None
        if d.device.type == "cuda" and dtype != torch.float32:
            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp else {})
        for block in model.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    train_model = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        train_model = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    if compile and compile_mode == "model":
        return torch.compile(train_model, **compile_kwargs)
    return train_model


def checkpoint_blocks(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every block, in place: its activations are recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    def recompute(forward, *args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for block in model.h:
        block.forward = functools.partial(recompute, block.forward)


def no_sync(train_model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce/reduce-scatter unless sync (the last micro-step)."""
    module = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP) reduced to a plain tensor; plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm over all ranks' shards, clipping to max_norm when it is > 0. No host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    total = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def grad_norms_by_module(model: nn.Module, scale: float = 1.0) -> dict[str, float]:
    """Gradient norm of each top-level part (wte, h.0, h.1, ..., ln_f, lm_head); syncs the host."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            parts = name.split(".")
            key = ".".join(parts[:2]) if parts[0] == "h" else parts[0]
            groups.setdefault(key, []).append(full_tensor(p.grad.norm()) / scale)
    names = list(groups)
    norms = torch.stack([torch.linalg.vector_norm(torch.stack(groups[k])) for k in names]).tolist()
    return dict(zip(names, norms))
