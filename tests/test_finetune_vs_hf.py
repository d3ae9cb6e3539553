"""finetune/train.py against Hugging Face transformers.Trainer + peft (the peer our users come from), on the
same tiny Llama, data, template, batches and hyperparameters: the same losses (bench/lora_sft_vs_hf.py
times the two jobs side by side)."""

import os
import sys

import pytest
from test_finetune_train import _config, assets  # noqa: F401  (the module's tiny model, data and tokenizer)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import lora_refactor  # noqa: E402
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


def test_the_bench_profiles_the_loop_step(assets, tmp_path, capsys):  # noqa: F811
    """--profile: our training step (loop.train_step) under torch.profiler, on the run's own batches: the
    GEMM share and the share of ignored targets are those of the batches it drew."""
    import json

    import torch

    from finetune.config import load_config
    from finetune.sft_data import SFTLoader, load_examples, tokenize_examples

    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    capsys.readouterr()
    assert lora_sft_vs_hf.main([config, "--profile", "2"]) == 0
    (r,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert r["profile"] and r["steps"] == 2 and r["ms_per_step"] > 0 and 0 < r["gemm_share"] < 1
    assert r["load_base_s"] >= 0 and r["apply_lora_s"] > 0  # PiSSA's SVDs take time even at this size
    assert r["top_ops_ms_per_step"][0][1] >= r["top_ops_ms_per_step"][-1][1] > 0
    # the same batches, drawn independently: the loader's 3rd and 4th, after the 2 warm-up steps
    cfg = load_config(config, lora_sft_vs_hf.SHARED)
    ds, t = cfg.dataset, cfg.training
    train = tokenize_examples(load_examples(ds.source, ds.split, fields=ds.fields, template=ds.template),
                              cfg.model.tokenizer or cfg.model.name_or_path, ds.max_length)
    loader = SFTLoader(train, t.per_device_train_batch_size, 1, seed=t.seed)
    ys = [loader.next_batch()[1] for _ in range(4)][2:]
    assert r["batch_shapes"] == [list(s) for s in sorted({tuple(y.shape) for y in ys})]
    assert r["ignored_target_share"] == pytest.approx(float((torch.cat([y.flatten() for y in ys]) == -1).float().mean()),
                                                      abs=1e-3)


def test_refactor_bench_at_init_and_after_training_against_peft(assets, tmp_path, capsys):  # noqa: F811
    """bench/lora_refactor.py on the tiny model: at init, exact and delta leave the PiSSA model's function and
    weights as they are, balanced changes both, clamp holds its bound; after training, the text loss of the
    base and of an adapter is the one transformers (+ peft) computes on the same windows."""
    import json

    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hf_checkpoint
    from finetune.config import load_config, lora_config
    from finetune.lora import apply_lora, lora_parameters, save_peft_adapter

    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    text = tmp_path / "text.txt"
    with open(assets["train"]) as f:
        text.write_text(" ".join(" ".join(str(v) for v in json.loads(line).values()) for line in f))
    cfg = load_config(config)
    adapter = str(tmp_path / "adapter")
    model = apply_lora(hf_checkpoint.from_hf(assets["model"]), lora_config(cfg), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # a stand-in for training
    save_peft_adapter(model, lora_config(cfg), adapter, assets["model"], convert_pissa_to_original_base=True)

    capsys.readouterr()
    assert lora_refactor.main([config, "--text", str(text), "--smoke", "--adapters", f"tuned={adapter}"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    init = {r["mode"]: r for r in rows if r.get("at") == "init"}
    after = {r["after"]: r["text_loss"] for r in rows if "after" in r}
    assert list(init) == ["none", "exact", "balanced", "clamp", "delta"] and list(after) == ["base", "tuned"]
    for mode in ("exact", "delta"):
        assert init[mode]["weight_change"] < 1e-5
        assert init[mode]["eval_loss"] == pytest.approx(init["none"]["eval_loss"], abs=1e-5)
    assert init["balanced"]["weight_change"] > 1e-2 and init["balanced"]["eval_loss"] != init["none"]["eval_loss"]
    assert init["clamp"]["sv_max_after"] <= init["clamp"]["bound"] * (1 + 1e-5) < init["clamp"]["sv_max_before"]
    assert init["none"]["text_loss"] == pytest.approx(after["base"], abs=1e-5)  # PiSSA at init is the base

    batches = lora_refactor.text_batches(assets["model"], str(text), 16, 4)
    hf = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()

    def hf_loss(m) -> float:
        with torch.no_grad():
            losses = [F.cross_entropy(m(input_ids=x).logits.flatten(0, 1), y.flatten()) * y.numel() for x, y in batches]
        return float(sum(losses) / sum(y.numel() for _, y in batches))

    assert after["base"] == pytest.approx(hf_loss(hf), abs=1e-5)
    assert after["tuned"] == pytest.approx(hf_loss(PeftModel.from_pretrained(hf, adapter).eval()), abs=1e-5)
    assert abs(after["tuned"] - after["base"]) > 1e-3  # the adapter changes the function
    assert lora_refactor.main([config, "--text", str(tmp_path / "missing.txt")]) == 2
    assert lora_refactor.main([config, "--text", str(text), "--adapters", "tuned"]) == 2
