"""
What the hardware can do: peak FLOP/s by GPU and dtype, model FLOPs utilisation (MFU), and an
estimate of training memory per GPU.

MFU = flops_per_token x tokens/s / (n_gpus x peak). The peaks are NVIDIA's dense (no sparsity)
tensor-core figures from each product's datasheet. float32 runs use TF32 tensor cores (train.py
enables them), so their peak is the TF32 one. An unknown GPU or a CPU has no peak: MFU is None,
never a guess.

memory_fit() compares the estimate with a GPU's free memory before the first step. train.py warns
rather than fails when it does not fit: the estimate is an estimate (the CUDA context, allocator
fragmentation and cuBLAS workspaces are not in it), so refusing would block runs that do fit; the
warning comes before compilation, so a run that will not fit can be stopped at once.
"""

from __future__ import annotations

import re

import torch

# (pattern on the lower-cased device name, label, {dtype: dense peak TFLOP/s}).
# Order matters: the first match wins, so specific variants come before generic names.
_BF16, _TF32 = "bfloat16", "float32"
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"h100.*pcie", "H100 PCIe", {_BF16: 756.5, _TF32: 378.0}),
    (r"h100.*nvl", "H100 NVL", {_BF16: 835.5, _TF32: 417.5}),
    (r"h100.*(sxm|hbm3)|h800|gh200", "H100 SXM", {_BF16: 989.4, _TF32: 494.7}),
    (r"h200.*nvl", "H200 NVL", {_BF16: 835.5, _TF32: 417.5}),
    (r"h200", "H200 SXM", {_BF16: 989.4, _TF32: 494.7}),
    (r"b200", "B200", {_BF16: 2250.0, _TF32: 1100.0}),
    (r"a100|a800", "A100", {_BF16: 312.0, _TF32: 156.0}),
    (r"rtx a6000", "RTX A6000", {_BF16: 154.8, _TF32: 77.4}),
    (r"l40s", "L40S", {_BF16: 362.05, _TF32: 183.0}),
    (r"\bl40\b", "L40", {_BF16: 181.05, _TF32: 90.5}),
    (r"rtx 4090", "RTX 4090", {_BF16: 165.2, _TF32: 82.6}),  # fp32 accumulate (as PyTorch uses)
    (r"\ba10g?\b", "A10", {_BF16: 125.0, _TF32: 62.5}),
    (r"\bl4\b", "L4", {_BF16: 121.0, _TF32: 60.0}),
]


def peak_flops(device_name: str | None, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s per GPU, note) for a CUDA device name and a training dtype; (None, why) if unknown."""
    if device_name is None:
        return None, "MFU not computed on CPU: there is no reliable peak FLOP/s"
    key = _TF32 if dtype == "float32" else _BF16  # float16 tensor cores run at the bfloat16 rate
    name = device_name.lower()
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[key] * 1e12, f"{label} dense {key.replace('float32', 'tf32')} peak {peaks[key]} TFLOP/s"
    return None, f"MFU not computed: no peak FLOP/s known for '{device_name}' (add it to hardware.PEAK_TFLOPS)"


def mfu(flops_per_token: int, tokens_per_sec: float, n_gpus: int, peak: float | None) -> float | None:
    """Fraction of the GPUs' peak achieved; None when the peak is unknown."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / (n_gpus * peak)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a dtype name: 'auto' is bfloat16 on GPUs that support it, else float32."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


# -----------------------------------------------------------------------------
# Memory estimate


def activation_bytes_per_token(model: torch.nn.Module, act_bytes: int, compiled: bool) -> int:
    """Bytes saved for backward per token by all blocks (flash/SDPA attention: no T x T scores).

    Eager keeps every intermediate autograd needs; torch.compile's partitioner recomputes the cheap
    elementwise ones (norms, activations, RoPE) and keeps roughly the matmul inputs. The residual
    stream is float32 under autocast.
    """
    c = model.config
    dim, q, kv = c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    hidden = c.intermediate_size
    mlp_in = 2 * hidden if c.gated_mlp else hidden
    attention = act_bytes * (q + 2 * kv + q)  # q, k, v and the attention output (+ tiny logsumexp)
    if compiled:  # swiglu: Inductor also keeps silu(gate) (measured: 97 KB/token/layer at the 1.5B preset)
        mlp = act_bytes * (mlp_in + 2 * hidden if c.gated_mlp else mlp_in + hidden)
        per_layer = 4 * 2 * dim + act_bytes * (2 * dim) + attention + mlp
    else:
        residual_and_norms = 4 * 2 * dim + 4 * 2 * dim + act_bytes * 2 * dim  # fp32 inputs/outputs, bf16 casts
        mlp = act_bytes * (mlp_in + 2 * hidden if c.gated_mlp else 2 * hidden)
        per_layer = residual_and_norms + attention + mlp
    return c.n_layer * per_layer + 4 * dim  # + the final norm's input


def training_memory(*, trained: int, frozen: int, frozen_bytes: int, world_size: int, zero1: bool, fsdp: bool,
                    grads_alive: bool, tokens: int, activation_bytes: int, act_bytes: int, n_embd: int, vocab: int,
                    chunk: int, head_trained: bool, gathered_block: int = 0, one_moment: int = 0) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step (the start of backward), by part; the one estimate that
    pretraining (estimate_memory) and LoRA (finetune/memory.py) fill in.

    trained parameters are fp32 masters with fp32 gradients and AdamW's two moments (sharded under ZeRO-1
    and FSDP); frozen ones are held in frozen_bytes each, with nothing else. gathered_block: parameters of
    the largest block that FSDP all-gathers (and prefetches) in the compute dtype. The fused loss keeps
    grad_x (tokens, C) and, for a trained head, grad_w (V, C, fp32) from forward to backward, plus one
    chunk of fp32 log-probabilities and the chunk's logits at a time. one_moment of the trained parameters
    have one fp32 optimizer buffer (Muon's momentum) instead of two.
    """
    shard = world_size if fsdp else 1
    return {
        "frozen_weights": frozen_bytes * frozen / shard,
        "trained_weights": 4 * trained / shard + 2 * act_bytes * gathered_block,
        "grads": 4 * trained / shard if grads_alive else 0.0,
        "optimizer": (8 * trained - 4 * one_moment) / (world_size if (zero1 or fsdp) else 1),  # exp_avg + exp_avg_sq in fp32
        "activations": tokens * activation_bytes,
        "loss_buffers": tokens * n_embd * act_bytes + (4 * vocab * n_embd if head_trained else 0) + chunk * vocab * (4 + act_bytes),
    }


def estimate_memory(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    dtype: str,
    world_size: int,
    zero1: bool,
    fsdp: bool,
    compiled: bool,
    grad_accum: int = 1,
    grads_kept: bool = False,
    one_moment: int = 0,
) -> dict[str, float]:
    """Estimated peak GiB per GPU of pretraining (training_memory with every parameter trained). The
    gradients are alive at the peak only with accumulation (or CUDA graphs, grads_kept): with one
    micro-step per rank they are None there (zero_grad(set_to_none=True)). Measured within 7% of the
    peak on an H100 (bench/RESULTS.md). CUDA context not included. one_moment: parameters whose optimizer
    keeps one fp32 buffer instead of AdamW's two (Muon's momentum, optim.muon_params)."""
    act_bytes = 4 if dtype == "float32" else 2
    tokens = batch_size * seq_len
    parts = training_memory(
        trained=model.num_params(), frozen=0, frozen_bytes=0, world_size=world_size, zero1=zero1, fsdp=fsdp,
        grads_alive=grad_accum > 1 or grads_kept, tokens=tokens,
        activation_bytes=activation_bytes_per_token(model, act_bytes, compiled), act_bytes=act_bytes,
        n_embd=model.config.n_embd, vocab=model.config.vocab_size, chunk=min(tokens, model.loss_chunk), head_trained=True,
        gathered_block=sum(p.numel() for p in model.h[0].parameters()) if fsdp else 0, one_moment=one_moment)
    gib = 1024**3
    out = {
        "weights_gb": parts["trained_weights"] / gib,
        "grads_gb": parts["grads"] / gib,
        "optimizer_gb": parts["optimizer"] / gib,
        "activations_gb": parts["activations"] / gib,
        "loss_buffers_gb": parts["loss_buffers"] / gib,
    }
    return out | {"total_gb": sum(out.values())}


def memory_fit(model: torch.nn.Module, batch_size: int, seq_len: int, dtype: str, world_size: int, zero1: bool,
               fsdp: bool, compiled: bool, free_bytes: int, grad_accum: int = 1, grads_kept: bool = False,
               one_moment: int = 0) -> str | None:
    """None when estimate_memory fits in free_bytes; else one line with the estimate, the free memory
    and the largest batch_size that the estimate says fits (0 when even the weights do not)."""
    def total(b: int) -> float:
        return estimate_memory(model, b, seq_len, dtype, world_size, zero1, fsdp, compiled, grad_accum,
                               grads_kept, one_moment)["total_gb"] * 1024**3

    need = total(batch_size)
    if need <= free_bytes:
        return None
    lo, hi = 0, batch_size  # the estimate grows with batch_size: bisect for the largest b with total(b) <= free
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= free_bytes else (lo, mid - 1)
    advice = f"the largest batch_size that fits is {lo}" if lo else "not even batch_size 1 fits: shard (use_fsdp) or use a smaller model"
    return (f"estimated {need / 1024**3:.2f} GiB per GPU for batch_size {batch_size} x {seq_len} but the device has "
            f"{free_bytes / 1024**3:.2f} GiB free; {advice} (raise gradient_accumulation_steps to keep the tokens per step)")
