"""
Sampling from the model: generate(), the KV cache it decodes with, and left padding for batches.

generate(model, idx, ...) samples new tokens after a prompt. With the cache (the default), the
prompt runs once (prefill) and every later step runs one token through GPT.forward(idx, cache=...):
the cache hands the model each token's position and the keys it may attend to, and keeps every
layer's keys and values. A batch of prompts of different lengths is left-padded (left_pad); its
attention mask goes into the cache, so each row decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from model import GPT


class KVCache:
    """Keys and values of every layer, preallocated (B, nkv, max_len, hd) on first use in the dtype of the
    keys (so autocast's dtype) and filled left to right; `length` positions are set.

    attention_mask (B, P) marks the prompt's real tokens (1) and its left padding (0); every later
    position is a real token. Positions count real tokens only, so a padded row starts at 0.
    """

    def __init__(self, n_layer: int, max_len: int, attention_mask: torch.Tensor) -> None:
        B, P = attention_mask.shape
        device = attention_mask.device
        self.max_len, self.length = max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.real = torch.ones(B, max_len, dtype=torch.bool, device=device)  # (B, max_len): not padding
        self.real[:, :P] = attention_mask.bool()
        prompt = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        after = prompt[:, -1:] + torch.arange(1, max_len - P + 1, device=device)  # (B, max_len - P)
        self.positions = torch.cat((prompt, after), dim=1)  # (B, max_len)

    def extend(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for T new tokens: their positions (B, T) and the boolean mask (B, 1, T, length + T)
        of the keys each may attend to. `length` then counts them."""
        past, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.length = end
        # Query i (at past + i) sees key j <= past + i that is not padding, and always itself, so a
        # padding query has a non-empty softmax (its output is never used).
        q_at = torch.arange(past, end, device=self.real.device)[:, None]  # (T, 1)
        k_at = torch.arange(end, device=self.real.device)[None, :]  # (1, L)
        mask = ((k_at <= q_at) & self.real[:, None, :end]) | (k_at == q_at)  # (B, T, L)
        return self.positions[:, past:end], mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) of the T positions extend() made room for; return all (B, nkv, length, hd)."""
        if self.k[layer] is None:
            B, n, _, hd = k.shape
            self.k[layer] = k.new_zeros(B, n, self.max_len, hd)
            self.v[layer] = v.new_zeros(B, n, self.max_len, hd)
        start = self.length - k.size(2)
        self.k[layer][:, :, start : self.length] = k
        self.v[layer][:, :, start : self.length] = v
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    vocab_limit: int | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample max_new_tokens after the prompt idx (B, T); temperature 0 means greedy.

    vocab_limit: only ids below it are sampled (a vocabulary padded past the tokenizer's has
    ids no tokenizer can decode). eos_id: a row that produced it gets eos_id from then on, and
    generation stops when every row has. attention_mask (B, T): 1 on prompt tokens, 0 on left
    padding (see left_pad); each row then decodes as it would alone.
    use_cache: keep every layer's keys and values (KVCache) so each step runs one token. When the
    prompt plus max_new_tokens exceeds block_size, the loop re-runs the cropped context each step
    instead, as nanoGPT does (the cache cannot slide a learned-position window).
    stop(new) -> (B,) bool, given the tokens generated so far (B, n): rows it marks are finished as if
    they had produced eos_id (which it therefore needs), e.g. once an answer line is complete.
    """
    if stop is not None and eos_id is None:
        raise ValueError("stop needs an eos_id to pad the rows it finishes")
    B, T = idx.shape
    block_size = model.config.block_size
    fits = T + max_new_tokens <= block_size
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match idx {tuple(idx.shape)}")
        if not (use_cache and fits):
            raise ValueError(f"attention_mask needs use_cache=True and prompt + max_new_tokens <= block_size="
                             f"{block_size}; got {T} + {max_new_tokens}")
    cache = None
    if use_cache and fits:
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask
        cache = KVCache(model.config.n_layer, T + max_new_tokens, mask)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if cache is not None:
            logits, _ = model(idx if step == 0 else idx[:, -1:], cache=cache)  # (B, 1, V)
        else:
            logits, _ = model(idx[:, -block_size:])  # (B, T, V)
        logits = logits[:, -1, :vocab_limit].float()  # (B, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished[:, None], eos_id)
            finished |= next_id[:, 0] == eos_id
        idx = torch.cat((idx, next_id), dim=1)
        if stop is not None:
            finished |= stop(idx[:, T:])
        if eos_id is not None and bool(finished.all()):
            break
    return idx


def left_pad(prompts: list[list[int]], pad_id: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (idx, attention_mask) int64 (B, T_max), padded on the left for generate()."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), T), dtype=torch.int64)
    for i, p in enumerate(prompts):
        if p:
            idx[i, T - len(p) :] = torch.tensor(p, dtype=torch.int64)
            mask[i, T - len(p) :] = 1
    return idx.to(device), mask.to(device)
