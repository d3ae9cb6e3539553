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

What a person can do wrong is refused too: lock() holds a flock on out_dir for a run's lifetime (one run
per out_dir), a save checks the free space first and turns a full disk into one CheckpointError that names
the intact previous checkpoint, deleting its own temp folder at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable

import torch

import atomic
from errors import UserError
from model import GPT, ModelConfig
from optim import local_optimizer
from parallel import Dist, Layout, all_reduce_max, barrier

CKPT, TMP, OLD = "ckpt", "ckpt.tmp", "ckpt.old"


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint; the message says what to do."""


class DirLock:
    """An exclusive flock on a folder itself (no lock file is left behind), held until release(), or
    release_locks() at the end of the command (loop.finish); the kernel releases it when the process dies,
    however it dies."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        _HELD.append(self)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_HELD: list[DirLock] = []


def release_locks() -> None:
    """Release every folder lock this process took (a command that ran in-process, as tests do, must not
    leave its folder locked for the next)."""
    while _HELD:
        _HELD.pop().release()


def lock(out_dir: str, flag: str = "out_dir") -> DirLock:
    """Hold out_dir for the run's lifetime (keep the returned DirLock). Another process holding it is a
    CheckpointError naming its PID: two runs writing one folder would delete each other's temps."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _lock_holder(out_dir) or "unknown"
        raise CheckpointError(f"another run (pid {holder}) is writing to --{flag}={out_dir}; wait for it to "
                              f"finish, stop it (kill {holder}), or choose another --{flag}") from None
    return DirLock(fd)


def _lock_holder(path: str) -> str | None:
    """The PID holding a flock on path, from Linux's /proc/locks (None elsewhere or when it is gone)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    return parts[4]
    except OSError:
        pass
    return None


def save_tensor_file(obj: object, path: str) -> None:
    """torch.save(obj) to path, fsync'd (into a checkpoint's temp folder: the folder swap makes it atomic).

    A write that fails (a full disk) is raised as its OSError: torch.save reports it as a RuntimeError
    from its zip writer ("unexpected pos ...") with the OSError only in the chain."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def tensor_bytes(tensors: Iterable[object]) -> int:
    """Bytes of every tensor in tensors, nested in dicts and lists (what torch.save will write, about)."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: this rank's part
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            total += tensor_bytes(t.values())
        elif isinstance(t, list | tuple):
            total += tensor_bytes(t)
    return total


def remove_temps(out_dir: str) -> None:
    """Delete the folders a crashed save left in out_dir: every <name>.tmp/ (save()'s ckpt.tmp/ or
    checkpoint-N.tmp/, a PEFT adapter's .peft.tmp/): never read, only confusing. Call on rank 0 at start,
    holding the lock (a second run must never delete a running run's temp folder)."""
    for name in os.listdir(out_dir):
        if name.endswith(".tmp") and os.path.isdir(os.path.join(out_dir, name)):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


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
    layout: Layout,
    state: dict,
    scaler: torch.amp.GradScaler | None = None,
    *,
    name: str = CKPT,
    model_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    write_extra: Callable[[str], None] | None = None,
) -> str:
    """Write a checkpoint collectively (every rank calls this); layout.name goes into state.json as its mode.

    The seams, for a caller that trains part of a model (LoRA): name is the folder under out_dir
    (e.g. checkpoint-100), model_state() what model.pt holds (called on every rank; default the full
    state dict), and write_extra(tmp_dir) adds files on rank 0 before state.json seals the folder.
    """
    model_sd = model_state() if model_state is not None else full_model_state_dict(model, layout)  # collective under FSDP
    bad = [k for k, v in model_sd.items() if not torch.isfinite(v).all()] if d.is_master else []
    if not _all_ok(not bad, d):  # every rank refuses together, none left waiting in a collective
        raise CheckpointError(f"refusing to save non-finite weights ({', '.join(bad[:3])}...); the run has diverged")

    tmp = os.path.join(out_dir, name + ".tmp")
    # the bytes this save adds while the previous checkpoint still exists, summed over ranks
    local_optimizer_state = local_optimizer(optimizer).state if layout.per_rank_optimizer_state or d.is_master else {}
    need = _sum_over_ranks(tensor_bytes([model_sd, list(local_optimizer_state.values())]), d)
    free = shutil.disk_usage(out_dir).free
    where = f"checkpoint {name} in {out_dir}"
    if not _all_ok(need <= free if d.is_master else True, d):
        raise CheckpointError(f"not enough space for {where}: it needs about {need / 2**20:,.0f} MiB and "
                              f"{free / 2**20:,.0f} MiB are free; {_previous(out_dir, name)}: free some space, "
                              f"then resume")
    failure = None
    try:
        if d.is_master:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            os.makedirs(tmp)
        barrier(d)
        if d.is_master:
            save_tensor_file(model_sd, os.path.join(tmp, "model.pt"))
        atomic.fault_point("after_model")
        if layout.shard_params:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=os.path.join(tmp, "optimizer_dcp"))
        elif layout.shard_optimizer:
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
    except OSError as e:  # a full disk above all: every rank learns of it below, so none waits forever
        failure = e
    if not _all_ok(failure is None, d):
        if d.is_master:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{failure.strerror or failure}" if failure is not None else "another rank could not write"
        if failure is not None and failure.errno == errno.ENOSPC:
            reason += f" (it needs about {need / 2**20:,.0f} MiB)"
        raise CheckpointError(f"cannot write {where}: {reason}; the temp folder is removed and "
                              f"{_previous(out_dir, name)}: free some space, then resume")
    if d.is_master:
        state = dict(state, world_size=d.world_size, mode=layout.name, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        atomic.replace_dir(tmp, os.path.join(out_dir, name))
    barrier(d)
    return os.path.join(out_dir, name)


def _sum_over_ranks(n: int, d: Dist) -> int:
    if d.world_size == 1:
        return n
    import torch.distributed as dist

    t = torch.tensor(float(n), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return int(t.item())


def _all_ok(ok: bool, d: Dist) -> bool:
    """Whether ok holds on every rank (a collective when world_size > 1)."""
    if d.world_size == 1:
        return ok
    return not bool(all_reduce_max(torch.tensor(0.0 if ok else 1.0, device=d.device), d).item())


def _previous(out_dir: str, name: str) -> str:
    """What a failed save leaves: the checkpoint of that name from before, if there is one."""
    path = os.path.join(out_dir, name)
    return f"the previous checkpoint {path} is intact" if os.path.isdir(path) else f"no earlier {path} exists"


def full_model_state_dict(model: torch.nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on CPU (rank 0 gets it under FSDP; others get {})."""
    if layout.shard_params:
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
    layout: Layout,
    state: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Restore optimizer, RNG and scaler state saved by save() into a model that already holds the weights."""
    saved = Layout.saved(state.get("mode"), state.get("world_size"))
    if saved is not None and saved.shard_optimizer and saved.dp_size != d.world_size:
        raise CheckpointError(
            f"this ZeRO-1 checkpoint was saved by {state.get('world_size')} processes and this run has "
            f"{d.world_size}; resume with --nproc_per_node={state.get('world_size')}"
        )
    if saved is None or not layout.same_sharding(saved):
        raise CheckpointError(
            f"checkpoint optimizer state was saved with {state.get('mode')} and this run uses {layout.name}; "
            "resume with the same parallelism flags (use_zero1 / use_fsdp)"
        )
    if layout.shard_params:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        osd = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(osd, checkpoint_id=os.path.join(path, "optimizer_dcp"))
        set_optimizer_state_dict(model, optimizer, osd["optimizer"])
    elif layout.shard_optimizer:
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
