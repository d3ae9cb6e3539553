"""
One decoder-only transformer, with GPT-2, LLaMA-2, LLaMA-3, Qwen3 and Gemma as presets of it.

The parts are chosen by config fields, never by a family's name (families.py maps a family to them):
- norm:                "layernorm" (with bias, GPT-2), "rmsnorm" (LLaMA, Qwen3) or "rmsnorm_1p" (scaled by
                         1 + weight, the weight starting at 0, all in float32: Gemma; Megatron's "layernorm_1p")
- mlp:                 "gelu" (4x, tanh-approximate GELU as GPT-2 uses), "gelu_exact" (the erf GELU that
                         nanoGPT and HF's activation "gelu" use; about half the CPU time), "swiglu" (LLaMA,
                         Qwen3) or "geglu" (gated like SwiGLU, with the tanh GELU: Gemma)
- position_embedding:  "learned" (GPT-2) or "rope" (rotate-half layout, as in Hugging Face checkpoints)
- rope_theta and the Llama-3.1 frequency scaling (rope_scaling_factor, low/high frequency factors,
  original context length)
- n_kv_head < n_head:  grouped-query attention (LLaMA-3, Qwen3)
- qk_norm:             per-head RMSNorm on q and k before RoPE (Qwen3)
- head_dim:            independent of n_embd / n_head (Qwen3)
- bias:                biases in every linear layer (GPT-2) or none
- tie_embeddings:      the output head reuses the token embedding
- scale_embeddings:    token embeddings times sqrt(n_embd), rounded to their dtype (Gemma)
- attention_backend:   "flash_attn_2", "sdpa" or "manual"

Implementation choices that differ from the Hugging Face modules (the function is the same):
- q, k and v are one fused linear (c_attn), and so are the SwiGLU gate and up projections (c_fc);
  one large matmul is faster than three small ones (GeGLU's too). hf_checkpoint.py splits and joins them.
- With targets, forward() computes the loss chunk by chunk (loss.py) without materialising the
  (B, T, vocab) logits, which for 128K-152K vocabularies is the largest activation in the model.
- forward(idx, cache=...) is the decoding step of generation.py: the cache gives each new token's
  position (per row, for left-padded batches) and the keys it may see, and keeps every layer's keys
  and values; only the last position's logits are computed. The training forward has no cache.

This file holds only the model: the fused loss is loss.py, sampling and the KV cache are
generation.py, Hugging Face conversion is hf_checkpoint.py. It imports no project module but loss.py,
and never torch.distributed: parallelism wraps it from outside (see parallel.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import linear_cross_entropy, loss_chunk_tokens

ATTENTION_BACKENDS = ("flash_attn_2", "sdpa", "manual")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_1p")
MLPS = ("gelu", "gelu_exact", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")  # c_fc outputs [gate | up]
POSITION_EMBEDDINGS = ("learned", "rope")


@dataclass
class ModelConfig:
    """Every architectural choice of the model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 for fast matmuls
    block_size: int = 1024  # longest sequence: size of the learned position table; generation crops to it
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention
    n_kv_head: int | None = None  # None: same as n_head (multi-head attention)
    n_embd: int = 768  # width of the residual stream
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; None: 4 * n_embd
    norm: str = "layernorm"  # 'layernorm' (GPT-2), 'rmsnorm' (LLaMA, Qwen3) or 'rmsnorm_1p' (1 + w, Gemma)
    norm_eps: float = 1e-5  # epsilon of every norm
    mlp: str = "gelu"  # 'gelu' (tanh approximation, GPT-2), 'gelu_exact', 'swiglu' (LLaMA, Qwen3) or 'geglu' (Gemma)
    position_embedding: str = "learned"  # 'learned' (GPT-2 table) or 'rope' (rotary)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling_factor: float | None = None  # Llama-3.1 frequency scaling; None: off
    rope_low_freq_factor: float = 1.0  # Llama-3.1 scaling: wavelengths above original/low are scaled
    rope_high_freq_factor: float = 4.0  # Llama-3.1 scaling: wavelengths below original/high are kept
    rope_original_max_seq_len: int = 8192  # Llama-3.1 scaling: the context length the base was trained at
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    bias: bool = True  # biases in the linears and LayerNorms (GPT-2)
    tie_embeddings: bool = True  # the output head shares the token embedding's weight
    scale_embeddings: bool = False  # token embeddings times sqrt(n_embd), rounded to their dtype (Gemma)
    dropout: float = 0.0  # dropout on attention weights and residual branches; 0: off
    attention_backend: str = "sdpa"  # 'sdpa' (torch), 'flash_attn_2' (the flash-attn package) or 'manual' (reference)
    init_std: float = 0.02  # standard deviation of the normal init (residual projections scaled by 1/sqrt(2 n_layer))
    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "change one of them or set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        _check_positive_int("head_dim", self.head_dim)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        _check_positive_int("intermediate_size", self.intermediate_size)
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; "
                "each KV head must serve a whole group of query heads"
            )
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        if self.position_embedding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        if self.rope_scaling_factor is not None:
            if not self.rope_scaling_factor > 0:
                raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be > 0")
            if not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
                raise ValueError(
                    f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                    f"rope_low_freq_factor={self.rope_low_freq_factor} > 0"
                )
            _check_positive_int("rope_original_max_seq_len", self.rope_original_max_seq_len)

    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (SwiGLU, GeGLU): c_fc is [gate | up], 2 x intermediate_size rows."""
        return self.mlp in GATED_MLPS

    @property
    def arch_string(self) -> str:
        """Short shape summary, e.g. '18L-16H-2048D-7168ff GQA(8kv)'."""
        s = f"{self.n_layer}L-{self.n_head}H-{self.n_embd}D-{self.intermediate_size}ff"
        if self.n_kv_head != self.n_head:
            s += f" GQA({self.n_kv_head}kv)"
        if self.head_dim * self.n_head != self.n_embd:
            s += f" hd{self.head_dim}"
        return s


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


# -----------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False until recently)."""

    def __init__(self, dim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then scaled in the input dtype (as the LLaMA reference does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x)
        return y * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class RMSNorm1p(RMSNorm):
    """RMSNorm scaled by (1 + weight), the weight starting at 0, computed in float32 then cast (as Gemma's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "rmsnorm_1p":
        return RMSNorm1p(dim, config.norm_eps)
    return LayerNorm(dim, config.bias, config.norm_eps)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32, with the Llama-3.1 scaling when configured.

    Computed per forward rather than stored as a buffer, so model.to(bfloat16) cannot round them.
    """
    hd = config.head_dim
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
    inv_freq = 1.0 / (config.rope_theta**exponent)
    if config.rope_scaling_factor is None:
        return inv_freq
    # Llama-3.1: leave high frequencies alone, divide low frequencies by `factor`,
    # and interpolate smoothly between the two wavelength thresholds.
    factor = config.rope_scaling_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (..., T, head_dim) for integer positions (..., T), computed in float32 then cast
    to dtype: 0..T-1 in training, per-row positions of a left-padded batch, or offset by a KV cache."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by position; first and second halves of hd form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


_flash_attn_func = None
_flash_warned = False


def _flash_attn_available() -> bool:
    """Import flash_attn lazily; warn once and return False when it or a GPU is missing."""
    global _flash_attn_func, _flash_warned
    if _flash_attn_func is not None:
        return True
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU"
    else:
        try:
            from flash_attn import flash_attn_func

            _flash_attn_func = flash_attn_func
            return True
        except ImportError:
            reason = "the flash_attn package is not installed (pip install flash-attn --no-build-isolation)"
    if not _flash_warned:
        warnings.warn(
            f"attention_backend=flash_attn_2 unavailable ({reason}); using sdpa instead", stacklevel=3
        )
        _flash_warned = True
    return False


class DecodeCache(Protocol):
    """The KV cache that forward() decodes with (generation.KVCache): all that model.py asks of it."""

    def extend(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for T new tokens: their positions (B, T) and the mask (B, 1, T, L) of keys each may see."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's k, v (B, nkv, T, hd) of the new tokens; return all (B, nkv, L, hd) so far."""


@dataclass
class CacheView:
    """What one attention layer needs to decode with a cache: the cache, its layer index, and the
    boolean mask (B, 1, T, L) of keys each new query may see."""

    cache: DecodeCache
    layer: int
    mask: torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = config.attention_backend
        if self.backend == "flash_attn_2" and not _flash_attn_available():
            self.backend = "sdpa"

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv: CacheView | None = None
    ) -> torch.Tensor:
        B, T, _ = x.size()
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0

        if kv is not None:
            # Decoding: attend over the cached keys and values plus these T, under kv's mask.
            k, v = kv.cache.update(kv.layer, k, v)  # (B, nkv, past + T, hd)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=kv.mask, dropout_p=dropout_p, enable_gqa=self.n_kv_head != self.n_head
            )
            y = y.transpose(1, 2).reshape(B, T, q_dim)
        elif self.backend == "flash_attn_2" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            # flash-attn wants (B, T, n, hd) and handles GQA itself.
            y = _flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p, causal=True
            )
            y = y.reshape(B, T, q_dim)
        else:
            if self.backend == "manual":
                y = self._manual_attention(q, k, v, dropout_p)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
                )
            y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, nh * hd)
        return self.resid_dropout(self.c_proj(y))

    def _manual_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Reference attention: explicit softmax(q k^T / sqrt(hd) + causal mask) v."""
        groups = self.n_head // self.n_kv_head
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, T, hd): kv head j serves q heads j*g..j*g+g-1
        v = v.repeat_interleave(groups, dim=1)
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att.float(), dim=-1).type_as(q)
        att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
        return att @ v  # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.gated_mlp
        self.silu = config.mlp == "swiglu"
        # the tanh GELU (GPT-2's "gelu_new", GeGLU's gate) or the erf GELU
        self.approximate = "none" if config.mlp == "gelu_exact" else "tanh"
        hidden = config.intermediate_size
        # A gated MLP's gate and up projections are fused: c_fc outputs [gate | up].
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.gated else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.silu else F.gelu(gate, approximate=self.approximate)) * up
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv: CacheView | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv)
        x = x + self.mlp(self.ln_2(x))
        return x


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        """Build the model. On the meta device it is left uninitialised: call to_empty() then init_weights()."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            nn.Embedding(config.block_size, config.n_embd) if config.position_embedding == "learned" else None
        )
        self.embed_scale = math.sqrt(config.n_embd) if config.scale_embeddings else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config, config.n_embd)
        # Tied embeddings reuse wte.weight in forward(), so there is no shared Parameter to re-tie
        # after meta-device materialisation or FSDP sharding.
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        )
        self.loss_chunk = loss_chunk_tokens(config.vocab_size)
        self.loss_variant: str | None = None  # one of loss.LOSS_VARIANTS; None: loss.default_loss_variant(device)
        if not self.wte.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Set every parameter and buffer (GPT-2 scheme), so a model built on meta can be materialised.

        | tensor                                   | init                               |
        |------------------------------------------|------------------------------------|
        | wte, wpe, lm_head, c_attn, c_fc          | normal(0, init_std)                |
        | attn.c_proj, mlp.c_proj (residual paths) | normal(0, init_std / sqrt(2 * n_layer)) |
        | every bias                               | 0                                  |
        | every norm weight (incl. q_norm, k_norm) | 1 (0 for rmsnorm_1p: its scale is 1 + weight) |

        The model has no buffers: RoPE frequencies are computed in forward().
        """
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, resid_std if name.endswith("c_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, LayerNorm | RMSNorm):
                module.reset_parameters()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count. non_embedding=True leaves out the input token and position embeddings.

        A tied output head shares wte, so it is counted once (and dropped with non_embedding).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Forward+backward training FLOPs per token (torchtitan's convention).

        6 x trainable matmul weights + 4 x frozen ones (forward 2 + input gradient 2, no weight
        gradient), output head included, input embedding excluded
        + 12 x n_layer x n_head x head_dim x seq_len for attention scores and values (no causal discount).
        """
        c = self.config
        weights = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        if self.lm_head is None:
            weights.append(self.wte.weight)  # the tied head is still a (V, C) matmul
        matmul = sum((6 if w.requires_grad else 4) * w.numel() for w in weights)
        return matmul + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: DecodeCache | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        Without targets: logits (B, T, vocab_size) for every position, loss None.
        With targets (B, T), -1 for ignored positions: the mean cross-entropy is computed chunk by
        chunk, without materialising the full logits, and logits is None.
        With a cache (generation.KVCache), idx continues the cached tokens: their positions and the
        padding mask come from the cache, every layer's keys and values are appended to it, and logits
        are (B, 1, vocab_size) for the last position only, so a prefill never builds (B, T, vocab).
        """
        B, T = idx.size()
        if T > self.config.block_size and self.wpe is not None:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        if cache is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        elif targets is not None:
            raise ValueError("a cache is for decoding; compute the loss without one")
        else:
            pos, mask = cache.extend(T)  # (B, T) per row, since a left-padded row starts at 0
        x = self.wte(idx)  # (B, T, C)
        if self.embed_scale is not None:  # rounded to the embeddings' dtype first, as Gemma does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            # q and k come out of a linear layer, so under autocast they are in the autocast dtype
            act_dtype = _autocast_dtype(idx.device.type) or x.dtype
            cos, sin = rope_cos_sin(rope_inv_freq(self.config, idx.device), pos, act_dtype)  # (T, hd)
            rope = (cos, sin) if cache is None else (cos[:, None], sin[:, None])  # cached: (B, 1, T, hd)
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, rope) if cache is None else block(x, rope, CacheView(cache, i, mask))
        if cache is not None:
            x = x[:, -1:]  # decoding needs only the next token's logits: no (B, T, vocab) in a prefill
        return self.head(x, targets)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Final norm and output head on the last hidden states x (B, T, C): (logits, None) or (None, loss).

        A method of its own so that compile_mode="blocks" can compile it apart from the blocks.
        """
        B, T, _ = x.size()
        x = self.ln_f(x)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight  # (V, C)
        if targets is None:
            return F.linear(x, head), None
        x = x.reshape(B * T, -1)
        act_dtype = _autocast_dtype(x.device.type)
        if act_dtype is not None:
            x = x.to(act_dtype)  # the fused loss runs its matmuls in the autocast dtype
        targets = targets.reshape(B * T)
        if B * T <= self.loss_chunk // 4:
            # Small logits (at most a quarter of one fused chunk, 2^26 fp32 at the default): the fused
            # loss saves no memory here and its per-chunk work costs more than one fused softmax kernel.
            loss = F.cross_entropy(F.linear(x, head).float(), targets, ignore_index=-1)
        else:
            loss = linear_cross_entropy(x, head, targets, self.loss_chunk, self.loss_variant)
        return None, loss


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for device_type, or None outside autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
