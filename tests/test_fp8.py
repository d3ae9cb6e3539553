"""fp8.py: which linears convert and why, FP8 numerics against bf16 (torchao emulation on CPU), FP8 runs
that train, save, resume and export like bf16 ones, and the errors for FP8 where it cannot run."""

import copy
import os

import pytest
import torch
import torchao  # noqa: E402, F401  (pinned in requirements.txt: a broken install must fail these tests, not skip them)
from test_train import ok, read_log, run_train, tiny_args

import configurator
import errors
import fp8
import hf_checkpoint
from model import GPT, ModelConfig
from train_config import TrainConfig


def _model_config(path: str, *overrides: str) -> ModelConfig:
    (_, mc), _ = configurator.load([path, *overrides], [TrainConfig, ModelConfig])
    return mc


def test_plan_keeps_the_head_and_odd_or_small_linears():
    # untied head, an MLP width that is not a multiple of 16
    mc = _model_config("config/tiny_llama3.py", "--tie_embeddings=False", "--intermediate_size=516")
    plan = fp8.plan(GPT(mc), "tensorwise", emulate=True)
    assert plan["lm_head"] == fp8.KEPT_HEAD
    assert plan["h.0.mlp.c_fc"] == fp8.KEPT_NOT_16 and plan["h.0.mlp.c_proj"] == fp8.KEPT_NOT_16
    assert plan["h.0.attn.c_attn"] == "fp8" and plan["h.0.attn.c_proj"] == "fp8"
    # with real kernels, torchao's size thresholds keep a 192-wide model entirely in bf16
    assert set(fp8.plan(GPT(mc), "tensorwise", emulate=False).values()) == {
        fp8.KEPT_HEAD, fp8.KEPT_NOT_16, fp8.KEPT_SMALL}


@pytest.mark.parametrize("recipe, n_fp8", [("tensorwise", 72), ("rowwise", 18)])
def test_plan_of_the_llama3_1_5b_preset(recipe, n_fp8):
    """Tensorwise converts every block linear; rowwise only the 2048 -> 14336 gate/up (torchao's H100 table)."""
    with torch.device("meta"):
        model = GPT(_model_config("config/full_llama3_1.5b_optimal.py"))
    plan = fp8.plan(model, recipe, emulate=False)
    assert sum(v == "fp8" for v in plan.values()) == n_fp8
    if recipe == "rowwise":
        assert {k.split(".", 2)[2] for k, v in plan.items() if v == "fp8"} == {"mlp.c_fc"}


def test_convert_swaps_modules_and_keeps_the_state_dict():
    from torchao.float8.float8_linear import Float8Linear

    model = GPT(_model_config("config/tiny_qwen3.py"))
    keys = {k: v.shape for k, v in model.state_dict().items()}
    plan, hooks = fp8.convert(model, "tensorwise", emulate=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {k for k, v in plan.items() if v == "fp8"} and len(converted) == 4 * 4
    assert {k: v.shape for k, v in model.state_dict().items()} == keys


@pytest.mark.parametrize("recipe, fsdp, n_hooks", [("tensorwise", False, 0), ("tensorwise", True, 1),
                                                    ("rowwise", True, 0)])
def test_convert_brings_its_own_after_step_hooks(recipe, fsdp, n_hooks):
    """The loop never names FP8: the conversion returns what must run after each optimizer step. Only FSDP
    with float8 all-gather (tensorwise) needs one, the refresh of the weights' scales."""
    _, hooks = fp8.convert(GPT(_model_config("config/tiny_qwen3.py")), recipe, emulate=True, fsdp=fsdp)
    assert len(hooks) == n_hooks and all(callable(h) for h in hooks)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_numerics_against_bf16(recipe):
    """Emulated FP8 against the same model in bf16 autocast. Measured on tiny_llama3 (4 layers, seed 0):
    loss within 3e-4 relative, the whole gradient within 11% (cosine 0.995); e4m3 keeps 3 mantissa
    bits, so ~6% per element is the expected scale. The error must also exceed bf16 rounding: a
    conversion that silently did nothing would pass the tolerances but not that check."""
    torch.manual_seed(0)
    ref = GPT(_model_config("config/tiny_llama3.py", "--vocab_size=256"))
    model = copy.deepcopy(ref)
    fp8.convert(model, recipe, emulate=True)
    idx, tgt = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_ref = ref(idx, tgt)
        _, loss = model(idx, tgt)
    loss_ref.backward()
    loss.backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 2e-3
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    assert 1e-3 < rel < 0.2
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0).item() > 0.98


@pytest.mark.slow
def test_fp8_run_trains_resumes_and_exports(char_dataset, tmp_path):
    """A few emulated-FP8 steps lower the loss; the checkpoint resumes and exports like a bf16 one."""
    out = tmp_path / "fp8"
    args = tiny_args(char_dataset, out, "--fp8=tensorwise", "--fp8_emulate=True", "--max_iters=12",
                     "--eval_interval=6", "--learning_rate=1e-2")
    p = ok(run_train(args))
    assert "16 of 17 linears in fp8" in p.stdout
    evals = read_log(out)["evaluations"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    sd = torch.load(os.path.join(out, "ckpt", "model.pt"), weights_only=True)
    assert set(sd) == set(GPT(_model_config("config/tiny_llama3.py", "--vocab_size=64")).state_dict())
    ok(run_train(args[:-5] + ["--fp8=tensorwise", "--fp8_emulate=True", "--max_iters=14", "--eval_interval=6",
                              "--learning_rate=1e-2", "--init_from=resume"]))
    assert read_log(out)["training_iterations"][-1]["iter"] == 13
    import subprocess
    import sys

    hf = tmp_path / "hf"
    ok(subprocess.run([sys.executable, "export_hf.py", f"--out_dir={out}", f"--hf_dir={hf}"], capture_output=True,
                      text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600))
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf)
    ours = hf_checkpoint.from_hf(str(hf))
    idx = torch.randint(0, 60, (2, 16))
    torch.testing.assert_close(hf_model(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)


def test_fp8_without_float8_tensor_cores_is_one_error_line(char_dataset, tmp_path):
    p = run_train(tiny_args(char_dataset, tmp_path / "x", "--fp8=tensorwise"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: fp8=tensorwise needs a CUDA GPU with float8 tensor cores")
    assert len(p.stderr.strip().splitlines()) == 1 and "--fp8_emulate=True" in p.stderr


@pytest.mark.parametrize("extra, message", [
    (["--fp8=blockwise"], "fp8='blockwise' is not one of"),
    (["--fp8_emulate=True"], "fp8_emulate=True needs fp8="),
    (["--use_cuda_graphs=True", "--use_fsdp=True"], "does not work with use_fsdp"),
    (["--use_cuda_graphs=True", "--compile_mode=blocks"], "use compile_mode=model"),
    (["--compile_mode=layers"], "compile_mode='layers' is not one of model, blocks"),
])
def test_fp8_and_compile_settings_that_cannot_run(extra, message):
    with pytest.raises(errors.ConfigError, match=message):
        configurator.load(["config/tiny_llama3.py", *extra], [TrainConfig, ModelConfig])


def test_dry_run_lists_the_fp8_linears():
    p = ok(run_train(["config/full_llama3_1.5b_optimal.py", "--dry_run=True", "--fp8=tensorwise"]))
    assert "fp8 tensorwise: 72 of 73 linears in fp8; 1 kept (output head" in p.stdout
    import json

    assert len(json.loads(p.stdout.strip().splitlines()[-1])["fp8_linears"]) == 72
