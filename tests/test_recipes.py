"""recipes/: torchtitan and Megatron-LM recipes generated from our presets, and our shards as Megatron data."""

import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import tomllib

import dataprep
from recipes import generate, megatron_data
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITAN_PRESETS = ["full_llama_1.36b", "full_llama3_1.5b_optimal", "full_llama3_2.2b_chinchilla",
                 "full_qwen3_1.8b_optimal", "llama3.1_8b"]
GUIDE_PRESETS = ["full_gpt2_1.36b"] + TITAN_PRESETS


def preset(name: str) -> str:
    return os.path.join(ROOT, "config", f"{name}.py")


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = generate.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def prepared(tmp_path, tok_name: str, n_docs: int = 40, shard_tokens: int | None = 300) -> str:
    """A tiny dataset written by the repo's own dataprep (several shards per split)."""
    rng = np.random.default_rng(0)
    words = "the king and queen of denmark speak often; naive cafe".split()
    src = tmp_path / "docs.jsonl"
    with open(src, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(3, 60)))}) + "\n")
    out = str(tmp_path / f"data_{tok_name}")
    dataprep.prepare(dataprep.local_source(str(src)), load_tokenizer(tok_name), out, dataset="tiny",
                     shard_tokens=shard_tokens, val_fraction=0.2, num_proc=1, progress=False)
    return out


def all_tokens(data_dir: str, split: str) -> np.ndarray:
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    return np.concatenate([np.fromfile(os.path.join(data_dir, s["file"]), meta["dtype"])
                           for s in meta["splits"][split]["shards"]])


@pytest.mark.parametrize("name", GUIDE_PRESETS)
def test_every_guide_preset_generates_both_recipes(name, tmp_path, capsys) -> None:
    mg = tmp_path / "mg"
    assert run_main(["megatron", preset(name), "--ngpu", "8", "--tp", "2", "--mock", "--out", str(mg)], capsys)[0] == 0
    assert run_main(["validate", str(mg)], capsys)[0] == 0
    script = str(mg / f"train_{name}.sh")
    assert subprocess.run(["bash", "-n", script], timeout=60).returncode == 0
    args = generate.megatron_arg_list(script)
    get = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    tc, mc = generate.load_preset(preset(name))
    # NullTokenizer adds one EOD: the vocab is exactly ours and the divisor x TP divides it (no padding).
    assert int(get["--vocab-size"]) + 1 == mc.vocab_size
    assert mc.vocab_size % (int(get["--make-vocab-size-divisible-by"]) * 2) == 0
    assert int(get["--num-layers"]) == mc.n_layer and int(get["--ffn-hidden-size"]) == mc.intermediate_size
    assert get["--normalization"] == ("RMSNorm" if mc.norm == "rmsnorm" else "LayerNorm")
    assert "--apply-layernorm-1p" not in args
    if mc.position_embedding == "rope":
        assert int(get["--rotary-base"]) == mc.rope_theta
    assert int(get["--global-batch-size"]) == tc.batch_size * tc.gradient_accumulation_steps
    if name not in TITAN_PRESETS:
        rc, _, err = run_main(["torchtitan", preset(name), "--ngpu", "8", "--out", str(tmp_path / "tt")], capsys)
        assert rc == 2 and err.startswith("error: torchtitan 0.2.2 has no model") and err.count("\n") == 1
        return
    tt = tmp_path / "tt"
    assert run_main(["torchtitan", preset(name), "--ngpu", "8", "--tp", "2", "--out", str(tt)], capsys)[0] == 0
    assert run_main(["validate", str(tt)], capsys)[0] == 0
    doc = tomllib.loads((tt / f"{name}.toml").read_text())
    p = doc["parallelism"]
    assert (p["data_parallel_replicate_degree"] * p["data_parallel_shard_degree"] * p["tensor_parallel_degree"]
            * p["pipeline_parallel_degree"] * p["context_parallel_degree"]) == 8
    assert set(doc) >= {"job", "profiling", "metrics", "model", "optimizer", "lr_scheduler", "training",
                        "parallelism", "checkpoint", "activation_checkpoint", "compile", "experimental"}
    assert doc["training"]["seq_len"] == tc.block_size and doc["model"]["flavor"] == name
    for f in ("README.md", "run_train.sh", f"{name}.toml"):
        assert not re.findall(r"(?<!\$)\{[A-Z][A-Z0-9_]+\}", (tt / f).read_text()), f
    assert subprocess.run(["bash", "-n", str(tt / "run_train.sh")], timeout=60).returncode == 0


def test_llama3_ffn_width_is_derived() -> None:
    """torchtitan's llama3 has no explicit FFN width; the multiplier we emit must give ours back."""
    for dim, hidden in ((4096, 14336), (2048, 7168), (2304, 6144), (1536, 4096)):
        mult, multiple_of = generate.llama_ffn(dim, hidden)
        assert generate.titan_ffn_width(dim, mult, multiple_of) == hidden
    assert generate.titan_ffn_width(4096, 1.3, 1024) == 14336  # torchtitan's own llama3_8b flavor


def test_vocab_divisor_rule() -> None:
    assert generate.vocab_divisor(151936, 2) == 64  # the default 128 would pad Qwen3 to 152,064 at TP=2
    assert generate.vocab_divisor(128256, 8) == 32
    assert generate.vocab_divisor(50304, 1) == 128
    with pytest.raises(generate.RecipeError):
        generate.vocab_divisor(50257, 2)


def test_run_train_sh_rejects_other_comm_backend(tmp_path, capsys) -> None:
    tt = tmp_path / "tt"
    assert run_main(["torchtitan", preset("full_llama3_1.5b_optimal"), "--ngpu", "8", "--out", str(tt)], capsys)[0] == 0
    r = subprocess.run(["bash", str(tt / "run_train.sh")], env={**os.environ, "COMM_BACKEND": "nvshmem"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.startswith("error: COMM_BACKEND=nvshmem") and r.stderr.count("\n") == 1


def test_idx_writer_matches_byte_spec() -> None:
    lengths = np.array([3, 1, 5], dtype=np.int64)
    got = megatron_data.index_bytes(lengths, 2, 8)
    want = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 3, 4)
            + struct.pack("<3i", 3, 1, 5) + struct.pack("<3q", 0, 6, 8) + struct.pack("<4q", 0, 1, 2, 3))
    assert got == want
    assert megatron_data.document_lengths(np.array([5, 0, 7, 7, 0, 9], np.uint16), 0).tolist() == [2, 3, 1]
    assert megatron_data.document_lengths(np.array([5, 0], np.uint16), 0).tolist() == [2]


@pytest.mark.parametrize("tok_name", ["gpt2", "llama3"])
def test_numpy_reader_gets_back_every_token_and_document(tok_name, tmp_path, capsys) -> None:
    """uint16 (gpt2) and uint32 (llama3) shards: the .idx indexes every token and every document."""
    data = prepared(tmp_path, tok_name)
    meta = json.load(open(os.path.join(data, "meta.json")))
    assert meta["dtype"] == ("uint16" if tok_name == "gpt2" else "uint32")
    rc, out, _ = run_main(["megatron-data", data], capsys)
    assert rc == 0 and out.startswith("--train-data-path ")
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        assert len(shards) > 1 or split == "val"
        docs = []
        for s in shards:
            prefix = os.path.join(data, s["file"][:-len(".bin")])
            docs += megatron_data.read_documents(prefix)
            assert f"{s['tokens']} {prefix}" in out
        assert np.array_equal(np.concatenate(docs), all_tokens(data, split))
        eos = meta["eos_id"]
        complete = [d for d in docs if d[-1] == eos]
        assert len(complete) == meta["splits"][split]["documents"]  # a document cut by a shard end is 2 pieces
        assert all((d[:-1] != eos).all() for d in docs)


def test_bad_inputs_are_one_error_line(tmp_path, capsys) -> None:
    out = str(tmp_path / "o")
    qwen, llama = preset("full_qwen3_1.8b_optimal"), preset("full_llama3_1.5b_optimal")
    odd = tmp_path / "odd_ffn.py"  # an FFN width that is not a multiple of 16
    odd.write_text(re.sub(r"^intermediate_size = \d+", "intermediate_size = 520",
                          open(preset("tiny_llama3")).read(), flags=re.M))
    cases = [
        (["torchtitan", llama, "--ngpu", "8", "--tp", "3", "--out", out], "does not divide --ngpu=8"),
        (["torchtitan", llama, "--ngpu", "8", "--tp", "2", "--dp_shard", "2", "--out", out], "must multiply"),
        (["megatron", llama, "--ngpu", "6", "--tp", "6", "--mock", "--out", out], "divisible by --tp=6"),
        (["torchtitan", qwen, "--ngpu", "8", "--pp", "2", "--out", out], "no pipeline parallelism for qwen3"),
        (["megatron", str(odd), "--ngpu", "8", "--fp8", "hybrid", "--mock", "--out", out], "intermediate_size=520"),
        (["torchtitan", str(odd), "--ngpu", "8", "--float8", "rowwise", "--out", out], "intermediate_size=520"),
        (["megatron", str(tmp_path / "nope.py"), "--ngpu", "8", "--mock", "--out", out], "unknown preset"),
        (["megatron", llama, "--ngpu", "8", "--data", str(tmp_path / "nodata"), "--out", out], "is not prepared"),
        (["torchtitan", llama, "--ngpu", "8", "--dataset", str(tmp_path / "nodata"), "--out", out], "is not prepared"),
        (["megatron-data", str(tmp_path / "nodata")], "is not prepared"),
        (["validate", str(tmp_path / "nodir")], "does not exist"),
    ]
    for argv, msg in cases:
        rc, _, err = run_main(argv, capsys)
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(out)  # every check runs before anything is written


def test_validate_rejects_mistyped_toml(tmp_path, capsys) -> None:
    tt = tmp_path / "tt"
    assert run_main(["torchtitan", preset("full_llama3_1.5b_optimal"), "--ngpu", "8", "--out", str(tt)], capsys)[0] == 0
    toml = tt / "full_llama3_1.5b_optimal.toml"
    toml.write_text(re.sub(r"^steps = \d+", 'steps = "ten"', toml.read_text(), flags=re.M))
    rc, _, err = run_main(["validate", str(tt)], capsys)
    assert rc == 2 and "[training] steps = 'ten' is not int" in err


def test_cli_entry_point_error_exit(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "recipes", "megatron", "config/nope.py", "--ngpu", "8", "--mock",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown preset") and "Traceback" not in r.stderr


def test_dry_run_validates_recipe_and_dataset(tmp_path, capsys) -> None:
    """DRY_RUN=1 ./run_train.sh is our validator (torchtitan 0.2.2 cannot dry-run on a CPU), data included."""
    if os.path.isfile(os.path.join(ROOT, "data", "slimpajama_6b_llama3", "meta.json")):
        pytest.skip("data/slimpajama_6b_llama3 is prepared in this checkout; the unprepared case needs it absent")
    env = {**os.environ, "DRY_RUN": "1", "NANOLLM_PYTHON": sys.executable}
    tt = tmp_path / "tt"
    assert run_main(["torchtitan", preset("full_llama3_1.5b_optimal"), "--ngpu", "8", "--out", str(tt)], capsys)[0] == 0
    r = subprocess.run(["bash", str(tt / "run_train.sh")], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 2 and "the dataset is not prepared" in r.stderr and r.stderr.count("\n") == 1
    data = prepared(tmp_path, "llama3")
    ok = tmp_path / "ok"
    assert run_main(["torchtitan", preset("full_llama3_1.5b_optimal"), "--ngpu", "8", "--dataset", data,
                     "--out", str(ok)], capsys)[0] == 0
    r = subprocess.run(["bash", str(ok / "run_train.sh")], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0 and "is prepared" in r.stdout, r.stderr


def test_relative_paths_work_from_the_checkout_and_land_absolute_in_the_script(tmp_path, capsys) -> None:
    """`python -m recipes validate recipes_out/mg` with a relative folder, and `megatron --data data/...` with a
    relative dataset, whose paths the script (run from a Megatron-LM checkout) must find."""
    data = os.path.relpath(prepared(tmp_path, "llama3"), ROOT)
    out = os.path.relpath(tmp_path / "mg", ROOT)
    run = [sys.executable, "-m", "recipes"]
    r = subprocess.run([*run, "megatron", "config/full_llama3_1.5b_optimal.py", "--ngpu", "8", "--data", data,
                        "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*run, "validate", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    args = generate.megatron_arg_list(str(tmp_path / "mg" / "train_full_llama3_1.5b_optimal.sh"))
    # with DATA_ARG=MOCK the script prints the mock branch; the generated NANOLLM branch is in the file
    script = (tmp_path / "mg" / "train_full_llama3_1.5b_optimal.sh").read_text()
    prefixes = re.findall(r"--train-data-path ((?:\d+ \S+ ?)+)", script)[0].split()[1::2]
    assert prefixes and all(os.path.isabs(p) and os.path.isfile(p + ".idx") for p in prefixes), prefixes
    assert "--mock-data" in args


def test_a_mock_recipe_refuses_the_nanollm_data_branch(tmp_path, capsys) -> None:
    mg = tmp_path / "mg"
    assert run_main(["megatron", preset("full_llama3_1.5b_optimal"), "--ngpu", "8", "--mock", "--out", str(mg)],
                    capsys)[0] == 0
    r = subprocess.run(["bash", str(mg / "train_full_llama3_1.5b_optimal.sh"), "ck", "tb", "NULL", "NANOLLM"],
                       env={**os.environ, "PRINT_ARGS": "1"}, capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 2 and r.stderr.startswith("error: this recipe was generated with --mock"), r.stderr


def test_a_large_vocabulary_preset_refuses_a_character_dataset(tmp_path, capsys) -> None:
    """LLaMA-3's 128,256 output rows on 19 characters: the wrong tokenizer's data, said in one line by both
    engines' generators (and by train.py: tests/test_safety.py)."""
    from conftest import write_char_dataset

    chars = write_char_dataset(tmp_path / "chars")
    llama3, out = preset("full_llama3_1.5b_optimal"), str(tmp_path / "o")
    for argv in (["torchtitan", llama3, "--ngpu", "8", "--dataset", chars, "--out", out],
                 ["megatron", llama3, "--ngpu", "8", "--data", chars, "--out", out]):
        rc, _, err = run_main(argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and "output rows would never see a token" in err, err
    assert not os.path.exists(out)


def test_generated_recipes_and_index_files_are_git_ignored(tmp_path) -> None:
    paths = ["recipes_out/mg/train_x.sh", "data/shakespeare_char/train.idx"]
    r = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == paths
