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
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs; found {n_gpu}"))


def write_char_dataset(out_dir, n_chars: int = 60_000, seed: int = 0) -> str:
    """A small character-level dataset with learnable structure (a random word-level Markov chain)."""
    import numpy as np

    from dataprep import write_tokens
    from tokenizer import CharTokenizer

    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "speaks", "to", "his", "her", "lord", "and", "fair", "night", "day", "o", "thou"]
    nxt = rng.integers(0, len(words), size=(len(words), 3))  # each word is followed by one of 3 words
    out, w = [], 0
    while sum(len(x) + 1 for x in out) < n_chars:
        out.append(words[w])
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
