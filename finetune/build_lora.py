"""
Fine-tuning's build, which finetune/train.py and the LoRA benches call: the base with its adapters
(lora_model), then the module to train and the adapters' optimizer (wrap_and_optimizer). The base itself comes
from the caller: hf_checkpoint.from_hf for a run, a random one of a preset's shape for a memory bench.
"""

from __future__ import annotations

import torch

import optim
import parallel
from finetune.lora import LoRAConfig, apply_lora, load_lora_state_dict
from model import GPT


def lora_model(base: GPT, lora: LoRAConfig, seed: int, init_state: dict[str, torch.Tensor] | None = None,
               adapters: dict[str, torch.Tensor] | None = None) -> GPT:
    """base with fp32 adapters, in place: PiSSA's SVD (or the seeded init) runs unless init_state (a resume)
    gives the initial factors; adapters (a resume's trained ones) are loaded over them."""
    # the base is in its training dtype already (an 8B bf16 checkpoint is never widened to fp32 in host
    # memory); the adapters are created in fp32 after it, and PiSSA's SVD runs in fp32 on each slice
    model = apply_lora(base, lora, seed=seed, init_state=init_state)
    if adapters is not None:
        device = next(model.parameters()).device
        load_lora_state_dict(model, {k: v.to(device) for k, v in adapters.items()})
    return model


def optimizer(model: torch.nn.Module, d: parallel.Dist, layout: parallel.Layout, *, lr: float,
              betas: tuple[float, float], weight_decay: float, eps: float) -> torch.optim.Optimizer:
    """AdamW over the trainable (adapter) parameters, as pretraining builds it, with the config's epsilon
    (training.adam_epsilon: HF Trainer's key); ZeRO-1 shards its state."""
    return optim.build_optimizer(model, d, zero1=layout.shard_optimizer, lr=lr, betas=betas,
                                 weight_decay=weight_decay, eps=eps)


def wrap_and_optimizer(model: GPT, d: parallel.Dist, layout: parallel.Layout, dtype: torch.dtype, *,
                       gradient_checkpointing: bool, lr: float, betas: tuple[float, float], weight_decay: float,
                       eps: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(train_model, optimizer): model wrapped for its layout (DDP / FSDP2; only the adapters train, so only
    they are reduced), eager, with per-block activation checkpointing if asked; then optimizer()."""
    train_model = parallel.wrap(model, d, fsdp=layout.shard_params, compile=False, cuda_graphs=False, dtype=dtype,
                                activation_checkpointing=gradient_checkpointing)
    return train_model, optimizer(model, d, layout, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
