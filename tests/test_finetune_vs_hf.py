"""finetune/train.py against Hugging Face transformers.Trainer + peft (the peer our users come from), on the
same tiny Llama, data, template, batches and hyperparameters: the same losses (bench/lora_sft_vs_hf.py
times the two jobs side by side)."""

import os
import sys

import pytest
from test_finetune_train import _config, assets  # noqa: F401  (the module's tiny model, data and tokenizer)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import lora_sft_vs_hf  # noqa: E402


@pytest.mark.slow
def test_same_losses_as_hf_trainer_with_peft(assets, tmp_path):  # noqa: F811
    """PiSSA init (deterministic, so both start from the same adapters), rsLoRA r=4 on every projection,
    8 AdamW steps with cosine decay and clipping. Measured: the eval loss before and after training equal to
    the printed digits, per-step training losses within 1e-6; allowed 1e-5 (10x)."""
    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    overrides = ["training.max_steps=8", "lora.init=pissa"]
    ours = lora_sft_vs_hf.ours(config, overrides, str(tmp_path / "ours"))
    hf = lora_sft_vs_hf.hf_run(config, overrides, str(tmp_path / "hf"))
    assert len(ours["train_loss"]) == len(hf["train_loss"]) == 8
    assert ours["eval_loss"][0] == pytest.approx(hf["eval_loss"][0], abs=1e-5)  # before: the same function
    assert ours["eval_loss"][1] == pytest.approx(hf["eval_loss"][1], abs=1e-5)
    assert ours["eval_loss"][1] < ours["eval_loss"][0]  # and both learned
    for a, b in zip(ours["train_loss"], hf["train_loss"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_bench_runs_and_compares(assets, tmp_path, capsys):  # noqa: F811
    import json

    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    assert lora_sft_vs_hf.main([config, "training.max_steps=2", "lora.init=pissa", "--smoke"]) == 0
    *runs, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["side"] for r in runs] == ["ours", "hf"] and summary["ratio_hf_over_ours"] > 0
    assert summary["ours_eval_loss"] == pytest.approx(summary["hf_eval_loss"], abs=1e-5)
    assert lora_sft_vs_hf.main([config, "--rounds", "0"]) == 2
