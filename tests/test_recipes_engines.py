"""
The generated recipes checked by the engines' own code, each in its own venv (recipes/engine_venvs.sh).

Marked `engines` (tests/conftest.py deselects them unless -m names them): building the two venvs takes minutes and each check starts a
fresh interpreter that imports the engine. Run: `.venv/bin/python -m pytest -m engines tests/test_recipes_engines.py`.
"""

import json
import os
import re
import subprocess

import pytest
import torch
from conftest import randomize
from test_recipes import ROOT, prepared, preset

import hf_checkpoint
from model import GPT
from recipes import generate, megatron_data
from token_loader import TokenLoader

pytestmark = [pytest.mark.engines, pytest.mark.timeout(3600)]  # the first run builds two venvs
CHECKS = os.path.join(ROOT, "tests", "engine_checks")


def venv_python(engine: str) -> str:
    r = subprocess.run(["bash", os.path.join(ROOT, "recipes", "engine_venvs.sh"), engine], capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    return os.path.join(r.stdout.strip().splitlines()[-1], "bin", "python")


@pytest.fixture(scope="module")
def titan() -> str:
    return venv_python("torchtitan")


@pytest.fixture(scope="module")
def megatron() -> str:
    return venv_python("megatron")


def run_check(python: str, script: str, case: dict, tmp_path) -> dict:
    path = tmp_path / f"case_{case['check']}.json"
    path.write_text(json.dumps(case))
    r = subprocess.run([python, os.path.join(CHECKS, script), str(path)], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def titan_recipe(name: str, out, *extra: str) -> tuple[str, str]:
    generate.torchtitan(preset(name), 1, str(out), **dict(zip(extra[::2], extra[1::2])))
    return str(out), os.path.join(str(out), f"{name}.toml")


def our_model(name: str, seed: int = 0) -> GPT:
    """The preset's model with every tensor random, RMSNorm weights (Qwen3's q/k norms included) too: with
    the init's all-ones norms, a dropped or swapped norm mapping would pass the logits and round-trip checks."""
    _, mc = generate.load_preset(preset(name))
    model = GPT(mc)
    randomize(model, seed=seed, std=0.05)
    return model.eval()


def test_titan_meta_model_has_our_count_and_hf_shapes(titan, tmp_path) -> None:
    names = ["full_llama3_1.5b_optimal", "full_llama3_2.2b_chinchilla", "full_qwen3_1.8b_optimal", "llama3.1_8b"]
    recipes = {n: titan_recipe(n, tmp_path / n) for n in names}
    got = run_check(titan, "titan_check.py", {"check": "shapes", "recipes": recipes}, tmp_path)
    for n in names:
        _, mc = generate.load_preset(preset(n))
        with torch.device("meta"):
            ours = GPT(mc)
        hf = hf_checkpoint.state_dict_to_hf(ours)
        assert got[n]["n_params"] == ours.num_params(), n
        assert got[n]["hf_shapes"] == {k: list(v.shape) for k, v in hf.items()}, n
    assert got["full_llama3_1.5b_optimal"]["n_params"] == 1_544_628_224
    assert got["full_qwen3_1.8b_optimal"]["n_params"] == 1_830_395_904


@pytest.mark.parametrize("name", ["tiny_llama3", "tiny_qwen3"])
def test_titan_tiny_flavor_logits_and_dcp_round_trip(name, titan, tmp_path) -> None:
    """Our weights -> HF -> torchtitan: same logits; -> DCP -> fresh model -> HF: the same tensors."""
    model = our_model(name)
    hf = str(tmp_path / "hf")
    hf_checkpoint.to_hf(model, hf, torch.float32)
    idx = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.save(idx, tmp_path / "idx.pt")
    with torch.no_grad():
        ours, _ = model(idx)
    d, toml = titan_recipe(name, tmp_path / "tt")
    base = {"dir": d, "toml": toml, "hf": hf}
    run_check(titan, "titan_check.py", {**base, "check": "logits", "idx": str(tmp_path / "idx.pt"),
                                        "out": str(tmp_path / "logits.pt")}, tmp_path)
    theirs = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (theirs - ours).abs().max().item() < 1e-4
    run_check(titan, "titan_check.py", {**base, "check": "dcp", "ckpt": str(tmp_path / "dcp"),
                                        "out": str(tmp_path / "back.pt")}, tmp_path)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    want = hf_checkpoint.state_dict_to_hf(model)
    assert back.keys() == want.keys()
    for k in want:
        assert torch.equal(back[k], want[k]), k


def test_titan_dataloader_yields_our_batches_and_resumes(titan, tmp_path) -> None:
    data = prepared(tmp_path, "llama3", n_docs=200)
    d, toml = titan_recipe("full_llama3_1.5b_optimal", tmp_path / "tt", "dataset", data)
    text = open(toml).read()
    for key, v in (("seq_len", 16), ("local_batch_size", 2), ("global_batch_size", 8)):
        text = re.sub(rf"^{key} = \d+", f"{key} = {v}", text, flags=re.M)
    open(toml, "w").write(text)
    dp, n = 2, 3
    run_check(titan, "titan_check.py", {"check": "loader", "dir": d, "toml": toml, "dp": dp, "n": n,
                                        "out": str(tmp_path / "batches.pt")}, tmp_path)
    got = torch.load(tmp_path / "batches.pt", weights_only=True)
    tc, _ = generate.load_preset(preset("full_llama3_1.5b_optimal"))
    for rank in range(dp):
        ours = TokenLoader(data, "train", 16, 2, 8 // (2 * dp), rank, dp, tc.seed)
        assert got[rank]["resumed"]
        for x, y in zip(got[rank]["x"], got[rank]["y"]):
            ox, oy = ours.next_batch()
            assert torch.equal(x, ox) and torch.equal(y, oy)


def test_titan_parser_rejects_unknown_key(titan, tmp_path) -> None:
    d, toml = titan_recipe("full_llama3_1.5b_optimal", tmp_path / "tt")
    text = open(toml).read().replace("\nsteps = ", "\nstepz = ")
    open(toml, "w").write(text)
    got = run_check(titan, "titan_check.py", {"check": "bad_toml", "dir": d, "toml": toml}, tmp_path)
    assert got["rejected"] and "stepz" in got["message"]


def test_megatron_core_reads_our_shards(megatron, tmp_path) -> None:
    """megatron-core's IndexedDataset and GPTDataset on our converted uint16 and uint32 shards."""
    for tok in ("gpt2", "llama3"):
        (tmp_path / tok).mkdir()
        data = prepared(tmp_path / tok, tok, n_docs=60)
        prefixes = megatron_data.convert(data)
        docs = {p: [d.tolist() for d in megatron_data.read_documents(p)] for _, p in prefixes["train"]}
        got = run_check(megatron, "megatron_check.py",
                        {"check": "read", "prefixes": [[n, p] for n, p in prefixes["train"]], "seq_len": 16,
                         "eod": json.load(open(os.path.join(data, "meta.json")))["eos_id"],
                         "cache": str(tmp_path / tok / "cache")}, tmp_path / tok)
        for p in docs:
            assert got["documents"][p] == docs[p]
        assert got["gpt_samples_ok"], got


@pytest.mark.parametrize("name", ["full_llama3_1.5b_optimal", "full_qwen3_1.8b_optimal"])
def test_megatron_lm_parser_accepts_generated_args(name, megatron, tmp_path) -> None:
    lm = os.environ.get("MEGATRON_LM")
    if not lm:
        pytest.skip("MEGATRON_LM is unset: Megatron-LM's parser (megatron/training) is not on PyPI and its source is "
                    "not ours to ship; point MEGATRON_LM at a core_r0.13.0 checkout to run this")
    paths = generate.megatron(preset(name), 8, str(tmp_path / "mg"), tp=2, mock=True)
    args = generate.megatron_arg_list(paths[0])
    _, mc = generate.load_preset(preset(name))
    got = run_check(megatron, "megatron_check.py", {"check": "parse", "megatron_lm": lm, "ngpu": 8, "args": args},
                    tmp_path)
    assert got["padded_vocab_size"] == mc.vocab_size
    assert got["normalization"] == "RMSNorm" and not got["apply_layernorm_1p"]
    assert got["rotary_base"] == int(mc.rope_theta)
