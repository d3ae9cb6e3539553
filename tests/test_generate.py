"""KV-cache generation: equal to the uncached loop, RoPE offsets, left-padded batches, EOS, the bench."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize
from test_model import FAMILIES, _tiny

from generation import KVCache, generate, left_pad
from model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(name: str, **overrides) -> GPT:
    m = GPT(_tiny(name, **overrides)).eval()
    randomize(m, seed=1)  # larger, distinct weights than the init: logits far from uniform
    return m


def _prompt(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_greedy_equals_uncached(name):
    m = _model(name)
    prompt = _prompt(3, 9)
    uncached = generate(m, prompt, 24, temperature=0, use_cache=False)
    assert torch.equal(generate(m, prompt, 24, temperature=0), uncached)
    assert torch.equal(generate(m, prompt, 24, temperature=0, top_k=1), uncached)  # top_k=1 sampling is greedy


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_logits_equal_full_forward_at_every_position(name):
    # The cache prefills 5 tokens and then feeds one at a time: each step's logits must equal the full
    # forward's at that position (RoPE offset by the cache length, learned positions likewise).
    m = _model(name)
    idx = _prompt(2, 16, seed=1)
    full, _ = m(idx)  # (B, T, V)
    cache = KVCache(m.config.n_layer, 16, torch.ones(2, 5, dtype=torch.long))
    got = [m(idx[:, :5], cache=cache)[0][:, -1]]
    for t in range(5, 16):
        got.append(m(idx[:, t : t + 1], cache=cache)[0][:, -1])
    assert cache.length == 16
    torch.testing.assert_close(torch.stack(got, 1), full[:, 4:], rtol=0, atol=1e-5)


def test_cached_forward_computes_only_the_last_logits():
    # Vocabularies are 49K-152K tokens: a prefill must not build (B, T, vocab) logits.
    m = _model("tiny_llama3")
    cache = KVCache(m.config.n_layer, 16, torch.ones(2, 10, dtype=torch.long))
    logits, loss = m(_prompt(2, 10), cache=cache)
    assert logits.shape == (2, 1, m.config.vocab_size) and loss is None
    with pytest.raises(ValueError, match="cache"):
        m(_prompt(2, 1), _prompt(2, 1), cache=cache)


def test_rope_scaling_is_used_by_the_cached_path():
    # Llama-3.1 scaling changes the function, so a cache that ignored it would decode differently.
    scaled, plain = _model("tiny_llama3"), _model("tiny_llama3", rope_scaling_factor=None)
    prompt = _prompt(2, 8)
    assert not torch.equal(generate(scaled, prompt, 16, temperature=0), generate(plain, prompt, 16, temperature=0))


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_equals_each_row_alone(name):
    m = _model(name)
    full = _prompt(4, 11, seed=2)
    prompts = [full[0, :3].tolist(), full[1].tolist(), full[2, :7].tolist(), full[3, :1].tolist()]
    idx, mask = left_pad(prompts, pad_id=0)
    assert mask.tolist()[0] == [0] * 8 + [1] * 3
    out = generate(m, idx, 15, temperature=0, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = generate(m, torch.tensor([p]), 15, temperature=0, use_cache=False)
        assert torch.equal(out[i, idx.size(1) - len(p) :], alone[0]), f"row {i}"


def test_eos_finishes_rows_independently():
    m = _model("tiny_qwen3")
    prompts = [_prompt(1, 4, seed=3)[0].tolist(), _prompt(1, 6, seed=4)[0].tolist()]
    idx, mask = left_pad(prompts, pad_id=0)
    free = generate(m, idx, 12, temperature=0, attention_mask=mask)
    eos = int(free[0, idx.size(1) + 2])  # row 0's third new token
    out = generate(m, idx, 12, temperature=0, attention_mask=mask, eos_id=eos)
    row0 = out[0, idx.size(1) :].tolist()
    first = row0.index(eos)
    assert row0[: first + 1] == free[0, idx.size(1) : idx.size(1) + first + 1].tolist()
    assert all(t == eos for t in row0[first:])  # finished rows keep emitting eos
    alone = generate(m, torch.tensor([prompts[0]]), 12, temperature=0, eos_id=eos)
    assert alone[0, len(prompts[0]) :].tolist() == row0[: first + 1]  # alone, it stops at its eos
    if eos not in free[1, idx.size(1) :].tolist():
        assert out.size(1) == free.size(1)  # row 1 never finishes, so all 12 steps run


def test_longer_than_block_size_falls_back_to_the_sliding_window():
    m = _model("tiny_gpt2", block_size=16)
    prompt = _prompt(2, 10)
    # 10 + 12 > 16: learned positions cannot go past 16, so both paths re-run the cropped window
    assert torch.equal(generate(m, prompt, 12, temperature=0), generate(m, prompt, 12, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="block_size"):
        generate(m, prompt, 12, temperature=0, attention_mask=torch.ones_like(prompt))
    with pytest.raises(ValueError, match="must match"):
        generate(m, prompt, 2, temperature=0, attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_generate_bench_smoke():
    r = subprocess.run([sys.executable, "bench/generate_bench.py", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "speedup" in r.stdout and "tokens/s" in r.stdout
