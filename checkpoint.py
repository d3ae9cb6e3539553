"""
Checkpoints: one folder, swapped in atomically, that a crash at any moment cannot corrupt.

    out_dir/ckpt/
      model.pt              the raw model's full state dict (no compile/DDP/FSDP prefixes), fp32
      optimizer.pt          AdamW state (single process and DDP: identical on every rank)
      optimizer_rank{r}.pt  ZeRO-1: each rank's shard (resume needs the same world size)
      optimizer_dcp/        FSDP: torch.distributed.checkpoint folder (reshardable)
      rng_rank{r}.pt        each rank's torch (and CUDA) RNG state
      scaler.pt             the fp16 GradScaler, when there is one
      state.json            iteration, tokens seen, best val loss, configs, loader state; written last

Every rank writes into out_dir/ckpt.tmp/; after a barrier, rank 0 renames ckpt -> ckpt.old,
ckpt.tmp -> ckpt, then deletes ckpt.old. A crash before the rename leaves the previous ckpt/
untouched; a crash between the two renames leaves ckpt.old/, which load() falls back to. A
ckpt.tmp/ left by a crash is deleted when the next run starts (remove_temps).
Multi-node runs need out_dir on a filesystem every node sees. Loads use weights_only=True.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable

import torch

import atomic
from configurator import UserError
from model import GPT, ModelConfig
from parallel import Dist, barrier, local_optimizer

CKPT, TMP, OLD = "ckpt", "ckpt.tmp", "ckpt.old"


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint; the message says what to do."""


def save_tensor_file(obj: object, path: str) -> None:
    """torch.save(obj) to path, fsync'd (into a checkpoint's temp folder: the folder swap makes it atomic)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def remove_temps(out_dir: str) -> None:
    """Delete what a crashed save left (out_dir/ckpt.tmp/): never read, only confusing. Call on rank 0 at start."""
    shutil.rmtree(os.path.join(out_dir, TMP), ignore_errors=True)


def find(out_dir: str) -> str | None:
    """The folder of the last complete checkpoint in out_dir, or None."""
    for name in (CKPT, OLD):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, "state.json")):
            return path
    return None


def save(
    out_dir: str,
    d: Dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    mode: str,
    state: dict,
    scaler: torch.amp.GradScaler | None = None,
    *,
    name: str = CKPT,
    model_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    write_extra: Callable[[str], None] | None = None,
) -> str:
    """Write a checkpoint collectively (every rank calls this). mode: 'single', 'ddp', 'zero1' or 'fsdp'.

    The seams, for a caller that trains part of a model (LoRA): name is the folder under out_dir
    (e.g. checkpoint-100), model_state() what model.pt holds (called on every rank; default the full
    state dict), and write_extra(tmp_dir) adds files on rank 0 before state.json seals the folder.
    """
    model_sd = model_state() if model_state is not None else full_model_state_dict(model, mode)  # collective under FSDP
    if d.is_master:
        bad = [k for k, v in model_sd.items() if not torch.isfinite(v).all()]
        ok = torch.tensor(0 if bad else 1)
    else:
        bad, ok = [], torch.tensor(1)
    if d.world_size > 1:
        import torch.distributed as dist

        dist.broadcast(ok.to(d.device), src=0)
    if not bool(ok):
        raise CheckpointError(f"refusing to save non-finite weights ({', '.join(bad[:3])}...); the run has diverged")

    tmp = os.path.join(out_dir, name + ".tmp")
    if d.is_master:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    barrier(d)
    if d.is_master:
        save_tensor_file(model_sd, os.path.join(tmp, "model.pt"))
    atomic.fault_point("after_model")
    if mode == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(tmp, "optimizer_dcp"))
    elif mode == "zero1":
        save_tensor_file(local_optimizer(optimizer).state_dict(), os.path.join(tmp, f"optimizer_rank{d.rank}.pt"))
    elif d.is_master:
        save_tensor_file(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    rng = {"torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    save_tensor_file(rng, os.path.join(tmp, f"rng_rank{d.rank}.pt"))
    if scaler is not None and d.is_master:
        save_tensor_file(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
    if write_extra is not None and d.is_master:
        write_extra(tmp)
    barrier(d)
    if d.is_master:
        state = dict(state, world_size=d.world_size, mode=mode, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        atomic.replace_dir(tmp, os.path.join(out_dir, name))
    barrier(d)
    return os.path.join(out_dir, name)


def full_model_state_dict(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU (rank 0 gets it under FSDP; others get {})."""
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def read_state(path: str) -> dict:
    try:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: state.json unreadable ({e}); delete it or use another out_dir") from e


def load_tensor_file(path: str) -> object:
    """torch.load(path, weights_only=True) on CPU, or a CheckpointError naming the missing or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"corrupt checkpoint: {path} is missing; delete the checkpoint or use another out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint file {path} ({type(e).__name__}); delete it or use another out_dir") from e


def latest(out_dir: str) -> tuple[str, dict]:
    """(folder, state) of the last complete checkpoint in out_dir, or a CheckpointError."""
    path = find(out_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {out_dir}/ckpt; train first, or check --out_dir")
    return path, read_state(path)


def load_model(path: str, config: ModelConfig | None = None) -> GPT:
    """The raw model saved in a checkpoint folder, on CPU, built with config (default: the saved one)."""
    if config is None:
        config = ModelConfig(**read_state(path)["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(load_tensor_file(os.path.join(path, "model.pt")), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model


def load_into(
    path: str,
    d: Dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    mode: str,
    state: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Restore optimizer, RNG and scaler state saved by save() into a model that already holds the weights."""
    if state.get("mode") == "zero1" and state.get("world_size") != d.world_size:
        raise CheckpointError(
            f"this ZeRO-1 checkpoint was saved by {state.get('world_size')} processes and this run has "
            f"{d.world_size}; resume with --nproc_per_node={state.get('world_size')}"
        )
    if state.get("mode") != mode and {state.get("mode"), mode} != {"single", "ddp"}:
        raise CheckpointError(
            f"checkpoint optimizer state was saved with {state.get('mode')} and this run uses {mode}; "
            "resume with the same parallelism flags (use_zero1 / use_fsdp)"
        )
    if mode == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        osd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(osd, checkpoint_id=os.path.join(path, "optimizer_dcp"))
        set_optimizer_state_dict(model, optimizer, osd["optimizer"])
    elif mode == "zero1":
        local_optimizer(optimizer).load_state_dict(load_tensor_file(os.path.join(path, f"optimizer_rank{d.rank}.pt")))
    else:
        optimizer.load_state_dict(load_tensor_file(os.path.join(path, "optimizer.pt")))
    rng_file = os.path.join(path, f"rng_rank{d.rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: those start fresh
        rng = load_tensor_file(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    if scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        scaler.load_state_dict(load_tensor_file(os.path.join(path, "scaler.pt")))
