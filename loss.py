"""
The output head's loss without the (N, vocab) logits: mean cross-entropy of x @ W^T, chunked over tokens.

For 128K-152K vocabularies the logits are the largest activation of the model. linear_cross_entropy
computes them one chunk of tokens at a time, and its forward pass also forms the gradients of x and W,
so no (N, V) tensor outlives its chunk; backward only scales them. model.py's head calls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The fused loss's ways to form d(loss)/d(logits), selectable by name (bench/loss_bench.py compares them):
# "scatter"      log_softmax, then exp_() + scatter_add_ in place: fewest passes in eager mode.
# "where"        lse = logsumexp, then g = where(iota == t, p - 1, p): one pointwise pass that
#                torch.compile fuses with the cast of g; under bf16 autocast its chunks are 2x larger.
# "where_addmm"  "where", plus grad_w accumulated by addmm(..., out_dtype=float32) straight from the
#                bf16 operands (CUDA only; elsewhere, and for fp32 inputs, it is "where").
LOSS_VARIANTS = ("scatter", "where", "where_addmm")
# The addmm overload with out_dtype (torch >= 2.8) exists only for CUDA with fp16/bf16 inputs.
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype")


def default_loss_variant(device_type: str) -> str:
    """The fused-loss variant used when a model sets none: the fastest measured on that device type."""
    return "scatter" if device_type == "cpu" else "where"


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ W^T) against targets, chunked over tokens.

    The forward pass computes each chunk's logits, loss and the gradients that are needed (need_x,
    need_w), and keeps only those: (N, C) and (V, C); no (N, V) tensor outlives its chunk. Backward
    scales them by grad_output. A frozen head (LoRA) skips the (V, C) gradient and its matmul.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        variant: str,
        need_x: bool,
        need_w: bool,
    ) -> torch.Tensor:
        # x: (N, C), weight: (V, C), targets: (N,) with -1 for ignored positions
        w = weight.to(x.dtype)
        valid = targets != -1
        safe_targets = targets.clamp(min=0)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None
        fp32_accumulate = (
            variant == "where_addmm" and _ADDMM_OUT_DTYPE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling()  # torch 2.11's fake tensors reject addmm(out_dtype=) (H100 run)
        )
        vocab = torch.arange(weight.size(0), device=x.device)  # (V,)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.size(0), chunk):
            sl = slice(start, start + chunk)
            t, v = safe_targets[sl, None], valid[sl, None]  # (c, 1)
            logits = (x[sl] @ w.t()).float()  # (c, V), fp32
            # d(loss_i)/d(logits_i) = softmax_i - onehot(target_i)
            if variant == "scatter":
                logprobs = torch.log_softmax(logits, dim=-1)
                loss = loss - (logprobs.gather(1, t) * v).sum()
                g = logprobs.exp_().scatter_add_(1, t, torch.full_like(t, -1.0, dtype=torch.float32)).to(x.dtype)
            else:
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (c, 1)
                loss = loss + ((lse - logits.gather(1, t)) * v).sum()
                p = torch.exp(logits - lse)
                g = torch.where(vocab == t, p - 1, p).to(x.dtype)  # (c, V)
            # ignored rows get zero gradient: mask the (c, C) operands, not the (c, V) one
            if need_x:
                grad_x[sl] = (g @ w) * v
            if need_w:
                xv = x[sl] * v  # (c, C)
                if fp32_accumulate:
                    if grad_w is None:
                        grad_w = torch.mm(g.t(), xv, out_dtype=torch.float32)
                    else:
                        grad_w = torch.addmm(grad_w, g.t(), xv, out_dtype=torch.float32)
                else:
                    gw = g.t() @ xv  # (V, C)
                    grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        n_valid = valid.sum().clamp(min=1)
        ctx.save_for_backward(grad_x, grad_w, n_valid)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gx = None if grad_x is None else (grad_x * scale).to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, variant: str | None = None
) -> torch.Tensor:
    """Mean cross-entropy of x (N, C) @ weight (V, C)^T against targets (N,), -1 ignored, chunk tokens at a time.

    Gradients flow to whichever of x and weight require them; variant is one of LOSS_VARIANTS
    (None: default_loss_variant of x's device).
    """
    variant = variant or default_loss_variant(x.device.type)
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"loss variant={variant!r} is not one of {', '.join(LOSS_VARIANTS)}")
    need_x, need_w = x.requires_grad, weight.requires_grad
    if not (torch.is_grad_enabled() and (need_x or need_w)):
        return _chunked_cross_entropy_eval(x, weight, targets, chunk)
    if variant != "scatter" and x.dtype in (torch.bfloat16, torch.float16):
        chunk *= 2  # no fp32 (c, V) buffer outlives a fused pass: half the bytes per logit
    return _LinearCrossEntropy.apply(x, weight, targets, chunk, variant, need_x, need_w)


def _chunked_cross_entropy_eval(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Same loss as _LinearCrossEntropy without gradients (eval, no_grad)."""
    w = weight.to(x.dtype)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    for start in range(0, x.size(0), chunk):
        logits = (x[start : start + chunk] @ w.t()).float()
        total = total + F.cross_entropy(
            logits, targets[start : start + chunk], ignore_index=-1, reduction="sum"
        )
    return total / (targets != -1).sum().clamp(min=1)


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the fused loss: about 2^28 logits (1 GiB in fp32), at least 256."""
    return max(256, (1 << 28) // vocab_size // 256 * 256)
