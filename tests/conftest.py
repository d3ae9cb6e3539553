import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Keep CPU tests deterministic and from oversubscribing a small CI box: under pytest-xdist (-n N) each
# worker, and the train.py/torchrun processes it starts, gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(4, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    # `engines` tests build separate venvs (minutes): deselected unless the -m expression names them.
    if "engines" not in (config.getoption("markexpr") or ""):
        engines = [item for item in items if "engines" in item.keywords]
        if engines:
            config.hook.pytest_deselected(items=engines)
            items[:] = [item for item in items if "engines" not in item.keywords]
    n_gpu = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and n_gpu < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none on this machine"))


def write_char_dataset(out_dir, n_chars: int = 60_000, seed: int = 0) -> str:
    """A small character-level dataset with learnable structure (a random word-level Markov chain)."""
    import numpy as np

    from dataprep import write_tokens
    from tokenizer import CharTokenizer

    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "speaks", "to", "his", "her", "lord", "and", "fair", "night", "day", "o", "thou"]
    nxt = rng.integers(0, len(words), size=(len(words), 3))  # each word is followed by one of 3 words
    out, w, length = [], 0, 0
    while length < n_chars:  # the same text as summing the lengths each time, in linear time
        out.append(words[w])
        length += len(words[w]) + 1
        w = int(nxt[w, rng.integers(0, 3)])
    text = " ".join(out)
    if len(text) > n_chars:
        text = text[:n_chars]
    tok = CharTokenizer("".join(sorted(set(text))))
    ids = np.array(tok.encode(text), dtype=np.int64)
    split = int(len(ids) * 0.9)
    write_tokens(str(out_dir), "synthetic_char", tok, {"train": ids[:split], "val": ids[split:]},
                 source="tests/conftest.py synthetic Markov text", documents={"train": 1, "val": 1})
    return str(out_dir)


@pytest.fixture(scope="session")
def char_dataset(tmp_path_factory) -> str:
    return write_char_dataset(tmp_path_factory.mktemp("data") / "synthetic_char")


# -----------------------------------------------------------------------------
# Tiny models: test files import these (`from conftest import tiny_gpt`) rather than type out their own.

TINY_GPT = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)  # GPT-2 features
LLAMA_FEATURES = dict(mlp="swiglu", norm="rmsnorm", position_embedding="rope", bias=False)  # for tiny_gpt(**...)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)  # GQA 2:1


def tiny_gpt(**overrides) -> torch.nn.Module:
    """Our GPT at TINY_GPT's shape (overrides replace ModelConfig fields), with its own init."""
    from model import GPT, ModelConfig

    return GPT(ModelConfig(**{**TINY_GPT, **overrides}))


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every tensor (norm weights and biases included) distinct random values, so that a
    mapping mistake anywhere shows in the logits: norms 1 + 0.2 N(0, 1), the rest std N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def tiny_hf_llama(path, *, seed: int = 0, std: float = 0.05, qwen3: bool = False, gemma: bool = False,
                  **overrides) -> str:
    """Save a transformers LlamaForCausalLM at TINY_LLAMA's shape (overrides replace LlamaConfig fields),
    every tensor randomised (randomize(seed, std)), to the folder path; return it.

    qwen3=True saves a Qwen3ForCausalLM instead (the same blocks plus QK-norm) from the same fields;
    gemma=True a GemmaForCausalLM ((1 + w) RMSNorm, GeGLU, scaled embeddings).
    """
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    config, cls = (Qwen3Config, Qwen3ForCausalLM) if qwen3 else (LlamaConfig, LlamaForCausalLM)
    if gemma:
        config, cls = GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)  # HF's own init draws from the global RNG: the test's later draws stay repeatable
    hf = cls(config(**{**TINY_LLAMA, **overrides}))
    randomize(hf, seed, std)
    if gemma:  # Gemma scales by 1 + w: w = 0.2 N(0, 1) gives the other families' norm scales
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.sub_(1.0)
    hf.save_pretrained(path)
    return str(path)


def read_until(proc, prefix: str, timeout: float = 180) -> list[str]:
    """Lines of proc's stdout (a text pipe) up to and including the first that starts with prefix. A process
    that is silent or finished without it is killed, failing the test, after `timeout` seconds."""
    import threading

    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(prefix):
                return seen
    finally:
        timer.cancel()
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s; output:\n{''.join(seen)[-2000:]}")
