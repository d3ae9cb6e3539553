"""families.py: the checklist holds for every family. Each has a tiny preset whose features find it, our
export of that preset is its transformers class with equal logits, config.json round-trips, and the recipes
refuse what they cannot build with one line. HF -> ours parity per family is in test_model.py, LoRA vs
peft per family in test_lora.py."""

import dataclasses
import os

import pytest
import torch
from conftest import randomize
from test_model import _tiny
from test_recipes import preset, run_main
from transformers import AutoModelForCausalLM

import families
import hf_checkpoint
from model import GPT

PRESETS = [(f.name, p) for f in families.FAMILIES.values() for p in f.presets]
NOT_IN_CONFIG_JSON = {"dropout", "attention_backend", "init_std"}  # training choices, not the function


@pytest.mark.parametrize("family,name", PRESETS)
def test_each_preset_exports_to_its_family_with_equal_logits(family, name, tmp_path):
    assert os.path.isfile(f"config/tiny_{name}.py"), "a family needs a tiny preset (SYSTEM_OVERVIEW's checklist)"
    torch.manual_seed(0)
    ours = GPT(_tiny(f"tiny_{name}")).eval()
    randomize(ours)  # every tensor distinct, norms included: a mapping mistake shows in the logits
    assert families.family_for(ours.config) is families.FAMILIES[family]
    hf_checkpoint.to_hf(ours, str(tmp_path / "hf"))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(theirs).__name__ == families.FAMILIES[family].architecture
    idx = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,name", PRESETS)
def test_config_json_round_trips(family, name):
    c = _tiny(f"tiny_{name}")
    back = hf_checkpoint.hf_to_config(hf_checkpoint.config_to_hf(c, torch.float32))
    differ = [f.name for f in dataclasses.fields(c)
              if f.name not in NOT_IN_CONFIG_JSON and getattr(c, f.name) != getattr(back, f.name)]
    assert not differ, differ


def test_gemma_norm_starts_at_zero_and_computes_one_plus_w():
    m = GPT(_tiny("tiny_gemma"))
    assert all(not n.weight.any() for n in (m.ln_f, m.h[0].ln_1, m.h[0].ln_2))  # scale 1 + 0 at init
    x = torch.randn(3, 128)
    with torch.no_grad():
        m.ln_f.weight.fill_(0.5)
        expected = 1.5 * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        torch.testing.assert_close(m.ln_f(x), expected)


def test_recipes_refuse_what_they_cannot_build(tmp_path, capsys):
    out = str(tmp_path / "o")
    gemma = preset("tiny_gemma")
    for argv, msg in (
        (["torchtitan", gemma, "--ngpu", "1", "--out", out], "has no model with norm=rmsnorm_1p, mlp=geglu"),
        (["megatron", gemma, "--ngpu", "1", "--mock", "--out", out], "maps no norm=rmsnorm_1p, mlp=geglu, scale_emb"),
    ):
        rc, _, err = run_main(argv, capsys)
        assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(out)
