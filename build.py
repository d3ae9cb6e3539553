"""
The build layer both entry points and the benches call, so a change to how a run is built reaches all of them:

- the pretraining model and its pieces: resolve_model_config (checkpoint, Hugging Face folder or config),
  build_model (the raw model), build (transforms, wrapping, optimizer), muon_settings, lr_at (the schedule),
  memory_estimate;
- what both train.py and finetune/train.py do around the loop: claim_out_dir and overwrite_out_dir (a new
  run never replaces a trained model unless asked), resume (optimizer, RNG and loader state of a checkpoint),
  model_summary (the run log's model section).

Fine-tuning's own build (base + LoRA, the adapters' optimizer) is finetune/build.py, over these.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict

import torch

import checkpoint
import fp8
import hardware
import loop
import optim
import parallel
from errors import UserError
from loop import RunState, TrainingError
from model import GPT, ModelConfig
from train_config import TrainConfig

# Model fields a resumed or Hugging Face run may change: they alter how, not what, is computed.
RUNTIME_MODEL_KEYS = {"attention_backend", "dropout"}


def resolve_model_config(tc: TrainConfig, mc: ModelConfig, explicit: set[str], meta: dict | None,
                         ckpt_state: dict | None) -> ModelConfig:
    """The architecture to build: from the checkpoint (resume), the HF folder, or the config."""
    runtime = {k: getattr(mc, k) for k in RUNTIME_MODEL_KEYS if k in explicit}
    if ckpt_state is not None:
        base = ModelConfig(**ckpt_state["model_config"])
        source = "the checkpoint"
    elif tc.init_from != "scratch":
        import hf_checkpoint

        base = hf_checkpoint.hf_to_config(hf_checkpoint.read_config(tc.init_from))
        source = f"the Hugging Face folder {tc.init_from}"
    else:
        if "vocab_size" not in explicit and meta is not None:
            mc.vocab_size = -(-meta["vocab_size"] // 64) * 64  # the dataset's vocabulary, padded to 64
        return mc
    for key in explicit & set(asdict(base)) - RUNTIME_MODEL_KEYS - {"block_size"}:
        if getattr(mc, key) != getattr(base, key):
            raise TrainingError(
                f"{key}={getattr(mc, key)} in your config disagrees with {source} ({key}={getattr(base, key)}); "
                "drop the override, or use another out_dir to train a new shape"
            )
    return ModelConfig(**{**asdict(base), **runtime})


def build_model(tc: TrainConfig, mc: ModelConfig, device: torch.device, ckpt_path: str | None) -> GPT:
    """The raw model on device: initialised (scratch), or holding checkpoint / Hugging Face weights."""
    if ckpt_path is not None:
        return checkpoint.load_model(ckpt_path, mc).to(device)
    if tc.init_from != "scratch":
        overrides = {k: getattr(mc, k) for k in RUNTIME_MODEL_KEYS}
        import hf_checkpoint

        return hf_checkpoint.from_hf(tc.init_from, dtype=torch.float32, **overrides).to(device)
    with torch.device("meta"):
        model = GPT(mc)
    model.to_empty(device=device)
    model.init_weights()  # the same seed on every rank: identical replicas before sharding
    return model


def _memory_args(model: torch.nn.Module, tc: TrainConfig, world_size: int, dtype: str) -> dict:
    """hardware.estimate_memory's and memory_fit's arguments after the model, from a pretraining config."""
    return dict(batch_size=tc.batch_size, seq_len=tc.block_size, dtype=dtype, world_size=world_size,
                zero1=tc.use_zero1, fsdp=tc.use_fsdp, compiled=tc.compile,
                grad_accum=tc.gradient_accumulation_steps // world_size, grads_kept=tc.use_cuda_graphs,
                one_moment=optim.muon_params(model) if tc.optimizer == "muon" else 0)


def memory_estimate(model: torch.nn.Module, tc: TrainConfig, world_size: int, dtype: str) -> dict[str, float]:
    """Estimated GiB per GPU of training model under tc over world_size processes (hardware.estimate_memory)."""
    return hardware.estimate_memory(model, **_memory_args(model, tc, world_size, dtype))


def build(tc: TrainConfig, mc: ModelConfig, d: parallel.Dist, dtype: torch.dtype,
          ckpt_path: str | None) -> tuple[GPT, torch.nn.Module, torch.optim.Optimizer, list, str | None]:
    """(model, train_model, optimizer, after-step hooks, fp8 summary or None): the raw model built and
    transformed, then wrapped; the optimizer over its trainable parameters."""
    torch.manual_seed(tc.seed)
    model = build_model(tc, mc, d.device, ckpt_path)
    hooks, fp8_summary = [], None
    if tc.fp8:  # a transform of the raw model, before compile and sharding
        plan, hooks = fp8.convert(model, tc.fp8, tc.fp8_emulate, fsdp=tc.use_fsdp)
        fp8_summary = fp8.summary(plan)
    if d.device.type == "cuda":  # warn before compilation and the first step, not after an OOM there
        misfit = hardware.memory_fit(model, free_bytes=torch.cuda.mem_get_info(d.device)[0],
                                     **_memory_args(model, tc, d.world_size, str(dtype).removeprefix("torch.")))
        if misfit:
            print(f"warning: {misfit}", file=sys.stderr, flush=True)
    train_model = parallel.wrap(model, d, fsdp=tc.use_fsdp, compile=tc.compile, cuda_graphs=tc.use_cuda_graphs,
                                dtype=dtype, compile_mode=tc.compile_mode)
    optimizer = optim.build_optimizer(model, d, zero1=tc.use_zero1, lr=tc.learning_rate,
                                      betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, muon=muon_settings(tc))
    return model, train_model, optimizer, hooks, fp8_summary


def muon_settings(tc: TrainConfig) -> optim.MuonSettings | None:
    """Muon's settings when optimizer=muon; None for AdamW."""
    if tc.optimizer != "muon":
        return None
    return optim.MuonSettings(tc.muon_lr_scale, tc.muon_momentum, tc.muon_ns_steps, tc.muon_adjust_lr)


def lr_at(tc: TrainConfig) -> Callable[[int], float]:
    """The schedule: the learning rate of optimizer step `it` (loop.get_lr with the config's keys)."""
    return lambda it: loop.get_lr(it, tc.learning_rate, tc.warmup_iters, tc.lr_decay_iters, tc.min_lr, tc.decay_lr,
                                  tc.lr_schedule, tc.lr_decay_fraction, tc.lr_decay_shape)


# -- around the loop: the output folder, a resume, the run log's model section ------------------------


def claim_out_dir(out_dir: str, flag: str, trained: Callable[[], list[str]],
                  refusal: Callable[[list[str]], UserError] | None) -> checkpoint.DirLock:
    """Take out_dir for a run (on rank 0): its lock (keep the returned DirLock while the run lives), then its
    crash leftovers. trained() lists what a trained run left there, read once the lock is held; refusal(found)
    is the error when a new run would replace it (None: this run may, as a resume or an overwrite does)."""
    held = checkpoint.lock(out_dir, flag)
    found = trained()
    if found and refusal is not None:
        raise refusal(found)
    checkpoint.remove_temps(out_dir)
    return held


def overwrite_out_dir(out_dir: str, names: list[str], d: parallel.Dist, note: str) -> None:
    """Delete names (files or folders) from out_dir on rank 0, now that the new run has passed every check and
    is about to train (a mistake in its flags must not cost the old model); every rank waits."""
    if d.is_master and names:
        for name in names:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        print(note, flush=True)
    parallel.barrier(d)


def resume(path: str | None, state: dict | None, d: parallel.Dist, layout: parallel.Layout, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, loader: object, seed: int,
           scaler: torch.amp.GradScaler | None = None) -> RunState:
    """The run's starting state: a checkpoint's optimizer, RNG, scaler and loader position (state is its
    state.json) restored into the built model, or a fresh start with the RNG seeded per rank. loader: anything
    with TokenLoader's load_state_dict()."""
    if state is None:
        torch.manual_seed(seed + d.rank)  # dropout differs by rank; a resume restores the saved RNG instead
        return RunState()
    checkpoint.load_into(path, d, model, optimizer, layout, state, scaler)
    loader.load_state_dict(state["loader"])
    return RunState(state["iter_num"], state["tokens_seen"], state["best_val_loss"])


def model_summary(model: GPT, flops_per_token: float, **extra) -> dict:
    """The run log's model section: architecture, parameter count, FLOPs per token and what the caller adds."""
    return {"architecture": model.config.arch_string, "n_params": model.num_params(), **extra,
            "flops_per_token": flops_per_token}
