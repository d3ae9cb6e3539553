"""
The memory a LoRA fine-tuning run needs per GPU: hardware.training_memory (the estimate pretraining uses)
with the base frozen and only the adapters trained, plus what LoRA changes in the activations.

The frozen base is held in bf16 (fp32 on CPU); the fp32 adapters have gradients and AdamW moments; the
head is frozen, so the fused loss keeps no (V, C) gradient. A frozen linear keeps no input for a weight
gradient; each adapter keeps its own dropped-out input (dropout > 0) or shares the normed input. With
activation checkpointing each block keeps only its fp32 input. CUDA context and allocator slack are not
included (add ~1-2 GiB). finetune/validate_config.py prints it; bench/lora_memory.py measures it.
"""

from __future__ import annotations

import torch

import hardware
from finetune.config import FinetuneConfig
from loss import loss_chunk_tokens
from model import GPT, ModelConfig

GIB = 1024**3


def projections(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each HF-named projection of one block of mc."""
    dim, q, kv, h = mc.n_embd, mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim, mc.intermediate_size
    out = {"q_proj": (dim, q), "k_proj": (dim, kv), "v_proj": (dim, kv), "o_proj": (q, dim), "up_proj": (dim, h),
           "down_proj": (h, dim)}
    if mc.gated_mlp:
        out["gate_proj"] = (dim, h)
    return out


def adapter_params(mc: ModelConfig, cfg: FinetuneConfig) -> int:
    """Trainable parameters: r x (in + out) per adapted projection per block."""
    proj = projections(mc)
    return mc.n_layer * sum(cfg.lora.r * sum(proj[t]) for t in cfg.lora.target_modules)


def activation_bytes_per_token(mc: ModelConfig, cfg: FinetuneConfig, act_bytes: int) -> int:
    """Bytes one block keeps for backward per token under LoRA (eager, SDPA/flash attention: no T x T).

    Frozen linears keep no input (their weight gets no gradient); the residual stream and the norms'
    inputs are fp32; SDPA keeps q and k after RoPE, v (a view that keeps the fused q/k/v output alive)
    and its output; SwiGLU (GeGLU) keeps the fused gate/up output and silu(gate) (gelu(gate)). o_proj's and down_proj's inputs
    are kept only for their adapters. Each adapter keeps its input: its own dropped-out copy plus a
    1-byte mask with dropout, else the shared normed input. Within 5% of the bytes counted by
    saved_tensors_hooks on CPU (tests/test_finetune_tools.py).
    """
    dim, q, kv, h = mc.n_embd, mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim, mc.intermediate_size
    targets, p = cfg.lora.target_modules, projections(mc)
    norms = 2 * 4 * dim  # fp32 inputs of the two norms
    attention = act_bytes * (q + kv + (q + 2 * kv) + q)  # q, k after RoPE; the fused output; SDPA's output
    mlp = act_bytes * (3 * h if mc.gated_mlp else h)  # the fused gate/up output, act(gate); or up
    kept = norms + attention + mlp
    if "o_proj" in targets:  # the inputs of o_proj and down_proj only serve their adapters' gradients
        kept += act_bytes * q
    if "down_proj" in targets:
        kept += act_bytes * h
    if cfg.lora.dropout > 0:
        kept += sum((act_bytes + 1) * p[t][0] for t in targets)
    else:  # the normed inputs of attention and MLP, when an adapter reads them
        kept += act_bytes * dim * (any(t in targets for t in ("q_proj", "k_proj", "v_proj"))
                                 + any(t in targets for t in ("gate_proj", "up_proj")))
    kept += sum(4 * cfg.lora.r for _ in targets)  # A x (r values, fp32) for B's gradient
    return mc.n_layer * kept


def estimate_memory(mc: ModelConfig, cfg: FinetuneConfig, world_size: int, on_gpu: bool = True) -> dict[str, float]:
    """GiB per GPU of the run, activations with and without checkpointing: hardware.training_memory with
    the base frozen in bf16 (fp32 on CPU) and only the fp32 adapters trained; the head is frozen too."""
    with torch.device("meta"):
        n_base = GPT(mc).num_params()
    t = cfg.training
    act_bytes = 2 if t.bf16 and on_gpu else 4
    n_ad = adapter_params(mc, cfg)
    tokens = t.per_device_train_batch_size * cfg.dataset.max_length
    per_token = activation_bytes_per_token(mc, cfg, act_bytes)
    parts = hardware.training_memory(
        trained=n_ad, frozen=n_base, frozen_bytes=act_bytes, world_size=world_size,
        zero1=t.parallel == "zero1" and world_size > 1, fsdp=t.parallel == "fsdp" and world_size > 1,
        grads_alive=True, tokens=tokens, activation_bytes=per_token, act_bytes=act_bytes, n_embd=mc.n_embd,
        vocab=mc.vocab_size, chunk=min(tokens, loss_chunk_tokens(mc.vocab_size)), head_trained=False)
    out = {
        "base_weights": parts["frozen_weights"],
        "adapters": parts["trained_weights"],
        "adapter_grads": parts["grads"],
        "adam_state": parts["optimizer"],
        "loss_buffers": parts["loss_buffers"],
        "activations": parts["activations"],
        # checkpointing keeps each block's fp32 input; one block's activations live during its backward
        "activations_checkpointed": tokens * (mc.n_layer * 4 * mc.n_embd + per_token // mc.n_layer),
    }
    fixed = sum(v for k, v in out.items() if not k.startswith("activations"))
    out["total"] = fixed + out["activations"]
    out["total_checkpointed"] = fixed + out["activations_checkpointed"]
    return {k: v / GIB for k, v in out.items()} | {"n_base_params": n_base, "n_adapter_params": n_ad,
                                                   "tokens_per_micro_batch": tokens}


def memory_lines(m: dict, cfg: FinetuneConfig, world_size: int) -> list[str]:
    """The estimate as readable lines."""
    t = cfg.training
    using = "on" if t.gradient_checkpointing else "off"
    return [
        f"memory per GPU ({t.parallel} on {world_size} GPU(s), micro-batch {t.per_device_train_batch_size} x "
        f"{cfg.dataset.max_length} = {m['tokens_per_micro_batch']:,} tokens; estimate, CUDA context not included):",
        f"  base weights {m['base_weights']:.2f} GiB ({m['n_base_params']:,} params, frozen), adapters "
        f"{m['adapters']:.2f} + grads {m['adapter_grads']:.2f} + AdamW {m['adam_state']:.2f} GiB "
        f"({m['n_adapter_params']:,} params, fp32), loss buffers {m['loss_buffers']:.2f} GiB",
        f"  activations {m['activations']:.2f} GiB -> total {m['total']:.2f} GiB without activation checkpointing",
        f"  activations {m['activations_checkpointed']:.2f} GiB -> total {m['total_checkpointed']:.2f} GiB with it "
        f"(training.gradient_checkpointing is {using})",
    ]
