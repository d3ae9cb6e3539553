"""train.py: schedule, MFU, dry run, config errors, and real CPU runs (resume, eval_only, faults)."""

import glob
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import read_until, tiny_gpt, tiny_hf_llama

import configurator
import errors
import hardware
import loop
import train
from model import GPT, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(args: list[str], env: dict | None = None, nproc: int = 0, timeout: int = 600):
    """python train.py ARGS (or torchrun with nproc processes) from the repo root."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd + ["train.py", *args], cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def tiny_args(dataset: str, out_dir, *extra: str, config: str | None = "config/tiny_llama3.py") -> list[str]:
    return [*([config] if config else []), f"--dataset={dataset}", f"--out_dir={out_dir}", "--compile=False",
            "--device=cpu", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", *extra]


def read_log(out_dir) -> dict:
    logs = sorted(glob.glob(os.path.join(str(out_dir), "run_*.json")))
    assert logs, f"no run log in {out_dir}"
    with open(logs[-1]) as f:
        return json.load(f)


def losses(log: dict) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in log["training_iterations"]}


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


# -----------------------------------------------------------------------------
# Pure functions


def test_lr_schedule_boundaries():
    kw = dict(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4)
    assert loop.get_lr(0, **kw) == pytest.approx(1e-3 / 11)  # warmup starts above zero
    assert loop.get_lr(9, **kw) == pytest.approx(1e-3 * 10 / 11)
    assert loop.get_lr(10, **kw) == pytest.approx(1e-3)  # end of warmup: the peak
    assert loop.get_lr(60, **kw) == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert loop.get_lr(110, **kw) == pytest.approx(1e-4)  # the floor
    assert loop.get_lr(10_000, **kw) == pytest.approx(1e-4)  # past the end
    decay = [loop.get_lr(i, **kw) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert loop.get_lr(50, **kw, decay_lr=False) == 1e-3
    assert loop.get_lr(0, 1e-3, 0, 100, 1e-4) == pytest.approx(1e-3)  # no warmup


@pytest.mark.parametrize(
    "name, dtype, tflops",
    [  # NVIDIA datasheet dense tensor-core figures
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
        ("NVIDIA A100 80GB PCIe", "float16", 312.0),
        ("NVIDIA A100-SXM4-40GB", "float32", 156.0),
        ("NVIDIA RTX A6000", "bfloat16", 154.8),
        ("NVIDIA L40S", "bfloat16", 362.05),
        ("NVIDIA L40", "bfloat16", 181.05),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", 756.5),
        ("NVIDIA H100 NVL", "bfloat16", 835.5),
        ("NVIDIA H200", "bfloat16", 989.4),
        ("NVIDIA H200", "float32", 494.7),
        ("NVIDIA B200", "bfloat16", 2250.0),
        ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2),
    ],
)
def test_peak_flops_table(name, dtype, tflops):
    peak, note = hardware.peak_flops(name, dtype)
    assert peak == pytest.approx(tflops * 1e12)
    assert str(tflops) in note


@pytest.mark.parametrize("name", [None, "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 3090", "AMD Instinct MI300X"])
def test_unknown_devices_have_no_mfu(name):
    peak, note = hardware.peak_flops(name, "bfloat16")
    assert peak is None and "MFU not computed" in note
    assert hardware.mfu(10**9, 1e5, 1, peak) is None


def test_mfu_formula():
    # 1e9 FLOPs/token at 400k tokens/s over 2 GPUs of 989.4 TFLOP/s
    assert hardware.mfu(10**9, 4e5, 2, 989.4e12) == pytest.approx(1e9 * 4e5 / (2 * 989.4e12))


def test_config_errors_in_process():
    with pytest.raises(errors.ConfigError, match="did you mean 'learning_rate'"):
        configurator.load_train(["--lerning_rate=1e-3"])
    with pytest.raises(errors.ConfigError, match="mutually exclusive"):
        configurator.load_train(["--use_zero1=True", "--use_fsdp=True"])
    with pytest.raises(errors.ConfigError, match="learning_rate='nan' must be a finite number"):
        configurator.load_train(["--learning_rate=nan"])
    with pytest.raises(errors.ConfigError, match="use_cuda_graphs=True needs compile=True"):
        configurator.load_train(["--use_cuda_graphs=True", "--compile=False"])
    tc, mc, explicit = configurator.load_train(["config/tiny_gpt2.py", "--batch_size=3", "--lr_decay_iters=None"])
    assert (tc.batch_size, tc.block_size, mc.block_size, tc.lr_decay_iters) == (3, 128, 128, tc.max_iters)
    assert {"batch_size", "n_layer", "lr_decay_iters"} <= explicit and "learning_rate" not in explicit


def test_dry_run_numbers():
    """The training guide's DRY_RUN for a preset: exit 0, no data read, numbers checked independently."""
    p = ok(run_train(["config/full_llama3_1.5b_optimal.py", "--dry_run=True", "--use_zero1=True",
                      "--dataset=no_such_dataset"], env={"WORLD_SIZE": "2"}))
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["n_params"] == 1_544_628_224
    V, d, L, H, hd, T = 128256, 2048, 18, 16, 128, 2048
    matmul = L * (d * (16 + 2 * 8) * hd + H * hd * d + 3 * d * 7168) + V * d  # blocks + untied head
    assert out["flops_per_token"] == 6 * matmul + 12 * L * H * hd * T
    assert out["n_params_non_embedding"] == out["n_params"] - V * d
    assert out["tokens_per_step"] == 8 * 24 * 2048 and out["gradient_accumulation_per_rank"] == 12
    mem = out["est_memory_breakdown_gb"]
    gib = 1024**3
    assert mem["weights_gb"] == pytest.approx(4 * out["n_params"] / gib, rel=1e-3)
    assert mem["optimizer_gb"] == pytest.approx(8 * out["n_params"] / 2 / gib, rel=1e-3)  # ZeRO-1 over 2 ranks
    assert out["est_memory_gb_per_gpu"] == pytest.approx(sum(mem.values()), rel=1e-3)
    assert "architecture: 18L-16H-2048D-7168ff GQA(8kv)" in p.stdout


def test_memory_estimate_sharding():
    with torch.device("meta"):
        m = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=1024))
    args = dict(batch_size=2, seq_len=64, dtype="bfloat16", world_size=4, compiled=False)
    ddp = hardware.estimate_memory(m, zero1=False, fsdp=False, **args)
    zero = hardware.estimate_memory(m, zero1=True, fsdp=False, **args)
    fsdp = hardware.estimate_memory(m, zero1=False, fsdp=True, **args)
    assert zero["optimizer_gb"] == pytest.approx(ddp["optimizer_gb"] / 4)
    assert zero["weights_gb"] == ddp["weights_gb"] and fsdp["grads_gb"] == pytest.approx(ddp["grads_gb"] / 4)
    assert fsdp["total_gb"] < zero["total_gb"] < ddp["total_gb"]
    compiled = hardware.estimate_memory(m, zero1=False, fsdp=False, **{**args, "compiled": True})
    assert compiled["activations_gb"] < ddp["activations_gb"]


# -----------------------------------------------------------------------------
# Real runs on the CPU


def test_training_run_learns_and_logs(char_dataset, tmp_path):
    out = tmp_path / "run"
    p = ok(run_train(tiny_args(char_dataset, out, "--max_iters=40", "--eval_interval=20",
                               "--gradient_log_interval=10")))
    log = read_log(out)
    evals = log["evaluations"]
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0  # it learns the synthetic grammar
    # the training guide's monitoring snippet, unchanged
    latest = log["training_iterations"][-1]
    assert latest["iter"] == 39 and math.isfinite(latest["loss"]) and latest["mfu"] is None  # CPU: no MFU
    record = log["training_iterations"][5]
    assert set(record) >= {"iter", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec", "mfu",
                           "memory_allocated_gb", "memory_peak_gb"}
    assert record["tokens_per_sec"] > 0 and record["dt_ms"] > 0
    assert log["training_iterations"][0]["dt_ms"] is None  # the first step is not timed
    env = log["environment"]
    assert env["world_size"] == 1 and env["torch_version"] == torch.__version__ and "git_sha" in env
    assert log["config"]["train"]["max_iters"] == 40 and log["config"]["model"]["n_kv_head"] == 2
    assert log["model"]["n_params"] > 0 and log["model"]["flops_per_token"] > 0
    assert [g["iter"] for g in log["gradient_norms"]] == [0, 10, 20, 30]
    assert set(log["gradient_norms"][0]["norms"]) == {"wte", "h.0", "h.1", "h.2", "h.3", "ln_f", "lm_head"}
    assert os.path.isfile(out / "ckpt" / "model.pt") and not os.path.exists(out / "ckpt.tmp")
    assert "iter 39: loss" in p.stdout


def _straight_and_resumed(dataset, tmp_path, extra: list[str], nproc: int = 0) -> tuple[dict, dict, str, str]:
    common = ["--eval_interval=3", "--lr_decay_iters=8", "--dropout=0.1", *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_train(tiny_args(dataset, straight, "--max_iters=8", *common), nproc=nproc))
    ok(run_train(tiny_args(dataset, split, "--max_iters=5", *common), nproc=nproc))
    first = losses(read_log(split))
    ok(run_train(tiny_args(dataset, split, "--max_iters=8", "--init_from=resume", *common), nproc=nproc))
    resumed = {**first, **losses(read_log(split))}
    return losses(read_log(straight)), resumed, str(straight), str(split)


def _same_weights(a: str, b: str) -> bool:
    wa = torch.load(os.path.join(a, "ckpt", "model.pt"), weights_only=True)
    wb = torch.load(os.path.join(b, "ckpt", "model.pt"), weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_single_process(char_dataset, tmp_path):
    """5 steps + resume + 3 steps == 8 straight, bit for bit (dropout on: the RNG state is restored)."""
    straight, resumed, a, b = _straight_and_resumed(char_dataset, tmp_path, [])
    assert sorted(resumed) == list(range(8))
    assert resumed == straight  # exact float equality
    assert _same_weights(a, b)


def test_eval_only_changes_nothing(char_dataset, tmp_path):
    out = tmp_path / "run"
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=6", "--eval_interval=3")))
    trained = read_log(out)
    before = {f: hashlib.sha256(open(f, "rb").read()).hexdigest() + str(os.stat(f).st_mtime_ns)
              for f in glob.glob(str(out / "ckpt" / "**"), recursive=True) if os.path.isfile(f)}
    p = ok(run_train(tiny_args(char_dataset, out, "--max_iters=6", "--init_from=resume", "--eval_only=True")))
    after = {f: hashlib.sha256(open(f, "rb").read()).hexdigest() + str(os.stat(f).st_mtime_ns)
             for f in glob.glob(str(out / "ckpt" / "**"), recursive=True) if os.path.isfile(f)}
    assert before == after
    assert sorted(os.listdir(out)) == sorted(["ckpt", *[os.path.basename(p) for p in glob.glob(str(out / "run_*.json"))]])
    log = read_log(out)
    assert log["training_iterations"] == [] and len(log["evaluations"]) == 1
    assert log["evaluations"][0]["iter"] == 6
    assert log["evaluations"][0]["val_loss"] == trained["evaluations"][-1]["val_loss"]  # same weights, same batches
    assert "eval at iter 6" in p.stdout


def test_nonfinite_steps_are_skipped(char_dataset, tmp_path, monkeypatch):
    """A NaN loss at chosen steps: those optimizer steps are skipped and logged, training goes on."""
    import model as model_module

    calls = {"n": 0}
    real_forward = model_module.GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in (3, 4):  # training steps 2 and 3 (one micro-step per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", poisoned)
    out = tmp_path / "nan"
    assert train.main(tiny_args(char_dataset, out, "--max_iters=6", "--eval_interval=100")) == 0
    log = read_log(out)
    skipped = [e["iter"] for e in log["events"] if e["event"] == "skipped_nonfinite_step"]
    assert skipped == [2, 3]
    recs = {r["iter"]: r for r in log["training_iterations"]}
    assert math.isnan(recs[2]["loss"]) and math.isfinite(recs[5]["loss"])
    weights = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())

    def always_nan(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        return (logits, loss * float("nan")) if targets is not None and torch.is_grad_enabled() else (logits, loss)

    monkeypatch.setattr(model_module.GPT, "forward", always_nan)  # every step: stop after 3 in a row
    rc = train.main(tiny_args(char_dataset, tmp_path / "nan2", "--max_iters=10", "--eval_interval=100",
                              "--max_nonfinite_steps=3"))
    assert rc == 2
    assert not os.path.exists(tmp_path / "nan2" / "ckpt")  # nothing non-finite (or diverged) was saved


@pytest.mark.parametrize("crash_at", ["after_model", "before_swap", "between_renames"])
def test_crash_during_save_keeps_last_checkpoint(char_dataset, tmp_path, crash_at):
    """Kill the process inside the 2nd save: the 1st checkpoint survives and resume reproduces the run."""
    common = ["--eval_interval=2", "--lr_decay_iters=6", "--always_save_checkpoint=True"]
    out = tmp_path / "crash"
    p = run_train(tiny_args(char_dataset, out, "--max_iters=6", *common), env={"NANOLLM_CRASH_AT": f"{crash_at}:2"})
    assert p.returncode == 17, p.stderr[-2000:]
    from checkpoint import find, read_state

    path = find(str(out))
    assert path is not None and read_state(path)["iter_num"] == 2
    torch.load(os.path.join(path, "model.pt"), weights_only=True)  # complete and loadable
    first = losses(read_log(out))
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=6", "--init_from=resume", *common)))
    resumed = {**{k: v for k, v in first.items() if k < 2}, **losses(read_log(out))}
    ok(run_train(tiny_args(char_dataset, tmp_path / "straight", "--max_iters=6", *common)))
    assert resumed == losses(read_log(tmp_path / "straight"))
    assert not os.path.exists(out / "ckpt.tmp") and not os.path.exists(out / "ckpt.old")


def test_init_from_hugging_face_folder(char_dataset, tmp_path):
    """Continued pretraining from a transformers folder: the first eval equals transformers' own loss."""
    from transformers import LlamaForCausalLM

    import token_loader

    # std=0.02: transformers' initializer_range, the scale of the model this test continues
    tiny_hf_llama(tmp_path / "hf", std=0.02, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = tmp_path / "cont"
    ok(run_train(tiny_args(char_dataset, out, f"--init_from={tmp_path / 'hf'}", "--max_iters=8",
                           "--eval_interval=8", config=None)))
    log = read_log(out)
    assert log["config"]["model"]["n_layer"] == 2 and log["config"]["model"]["vocab_size"] == 96
    batches = token_loader.eval_batches(char_dataset, "val", 32, 4, 2)
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(hf(x).logits.view(-1, 96), y.view(-1)) for x, y in batches) / 2
    assert log["evaluations"][0]["val_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert log["evaluations"][-1]["val_loss"] < log["evaluations"][0]["val_loss"]


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback, nonzero exit


@pytest.fixture(scope="module")
def trained_run(char_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=2", "--eval_interval=2")))
    return str(out)


def _corrupt(trained_run, tmp_path, what: str) -> str:
    import shutil

    dst = tmp_path / "corrupt"
    shutil.copytree(trained_run, dst)
    if what == "model":
        with open(dst / "ckpt" / "model.pt", "r+b") as f:
            f.truncate(100)
    else:
        (dst / "ckpt" / "state.json").write_text("{ not json")
    return str(dst)


BAD_INPUTS = {
    "unknown flag": (["--lerning_rate=1e-3"], "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"),
    "wrong type": (["--batch_size=abc"], "batch_size='abc' is not an integer"),
    "bad boolean": (["--compile=maybe"], "compile='maybe' is not a boolean"),
    "not key=value": (["--compile"], "overrides are written --key=value"),
    "missing config file": (["config/no_such.py"], "config file not found: config/no_such.py"),
    "missing dataset": (["--dataset=no_such_set"], "dataset not found"),
    "mutually exclusive": (["--use_zero1=True", "--use_fsdp=True"], "mutually exclusive"),
    "cuda graphs on cpu": (["--use_cuda_graphs=True", "--compile=True"], "needs a CUDA GPU"),
    "nan learning rate": (["--learning_rate=nan"], "must be a finite number"),
    "zero batch": (["--batch_size=0"], "batch_size=0 must be > 0"),
    "heads do not divide": (["--n_head=5"], "not divisible by n_head=5"),
    "kv heads do not divide": (["--n_kv_head=4"], "n_head=6 is not divisible by n_kv_head=4"),
    "unknown backend": (["--attention_backend=flash3"], "attention_backend='flash3' is not one of"),
    "bad dtype": (["--dtype=fp8"], "dtype='fp8' is not one of"),
    "bad device": (["--device=tpu"], "device='tpu'"),
    "vocab too small": (["--vocab_size=8"], "set --vocab_size=19 or larger"),
    "no checkpoint": (["--init_from=resume", "--out_dir=/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    "bad init_from": (["--init_from=/no/such/folder"], "is not 'scratch', 'resume' or an existing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clean_line(case, char_dataset, tmp_path):
    args, message = BAD_INPUTS[case]
    if case == "missing config file":  # the config file must come first
        p = run_train(args + tiny_args(char_dataset, tmp_path / "o", "--max_iters=2", config=None))
    else:
        p = run_train(tiny_args(char_dataset, tmp_path / "o", "--max_iters=2", *args))
    _assert_clean_error(p, message)


@pytest.mark.parametrize(
    "case, message",
    [("model", "corrupt checkpoint file"), ("state", "corrupt checkpoint"),
     ("shape", "n_layer=3 in your config disagrees with the checkpoint (n_layer=4)")],
)
def test_bad_checkpoint_is_one_clean_line(case, message, trained_run, char_dataset, tmp_path):
    out = _corrupt(trained_run, tmp_path, case) if case != "shape" else trained_run
    extra = ["--n_layer=3"] if case == "shape" else []
    p = run_train(tiny_args(char_dataset, out, "--max_iters=4", "--init_from=resume", *extra))
    _assert_clean_error(p, message)


def test_corrupt_shard_is_one_clean_line(char_dataset, tmp_path):
    import shutil

    bad = tmp_path / "bad_data"
    shutil.copytree(char_dataset, bad)
    with open(bad / "train.bin", "ab") as f:
        f.write(b"\x01")  # no longer a multiple of uint16
    p = run_train(tiny_args(str(bad), tmp_path / "o", "--max_iters=2"))
    _assert_clean_error(p, "train.bin")


def _assert_clean_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


# -----------------------------------------------------------------------------
# Other paths of the loop: precisions, DataLoader workers, compile, Ctrl-C, sampling, export


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_runs_learn(dtype, char_dataset, tmp_path):
    """bf16 autocast, and fp16 with its gradient scaler, on CPU."""
    out = tmp_path / dtype
    ok(run_train(tiny_args(char_dataset, out, f"--dtype={dtype}", "--max_iters=30", "--eval_interval=30")))
    log = read_log(out)
    assert log["environment"]["dtype"] == f"torch.{dtype}"
    assert log["evaluations"][-1]["val_loss"] < log["evaluations"][0]["val_loss"] - 0.5


def test_dataloader_workers_give_the_same_run(char_dataset, tmp_path):
    common = ["--max_iters=6", "--eval_interval=6", "--gradient_accumulation_steps=2"]
    ok(run_train(tiny_args(char_dataset, tmp_path / "a", *common)))
    ok(run_train(tiny_args(char_dataset, tmp_path / "b", *common, "--use_dataloader=True",
                           "--dataloader_num_workers=2")))
    assert losses(read_log(tmp_path / "a")) == losses(read_log(tmp_path / "b"))


@pytest.mark.slow
def test_compiled_training_matches_eager(char_dataset, tmp_path):
    common = ["--max_iters=4", "--eval_interval=4", "--gradient_accumulation_steps=2"]
    ok(run_train(tiny_args(char_dataset, tmp_path / "eager", *common)))
    p = ok(run_train(tiny_args(char_dataset, tmp_path / "compiled", *common, "--compile=True")))
    eager, compiled = losses(read_log(tmp_path / "eager")), losses(read_log(tmp_path / "compiled"))
    assert sorted(compiled) == sorted(eager)
    for it in eager:
        assert compiled[it] == pytest.approx(eager[it], abs=1e-4)
    assert "compile=True" in p.stdout


def test_ctrl_c_saves_and_exits_cleanly(char_dataset, tmp_path):
    import signal

    out = tmp_path / "interrupted"
    cmd = [sys.executable, "train.py", *tiny_args(char_dataset, out, "--max_iters=100000", "--eval_interval=100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    read_until(proc, "iter 3:")  # wait until training is under way (killed and failed after 3 minutes)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at iter" in stdout
    from checkpoint import find, read_state

    it = read_state(find(str(out)))["iter_num"]
    assert it >= 4 and f"interrupted at iter {it}" in stdout
    assert read_log(out)["training_iterations"][-1]["iter"] == it - 1


def test_non_finite_weights_are_never_saved(tmp_path):
    import checkpoint
    import parallel

    m = tiny_gpt(n_embd=32)
    with torch.no_grad():
        m.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    opt = torch.optim.AdamW(m.parameters())
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    with pytest.raises(checkpoint.CheckpointError, match="refusing to save non-finite weights"):
        checkpoint.save(str(tmp_path), d, m, opt, parallel.layout(d, zero1=False, fsdp=False), {"iter_num": 1})
    assert os.listdir(tmp_path) == []


def test_sample_and_export_from_a_checkpoint(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={trained_run}", "--start=the king",
                        "--num_samples=2", "--max_new_tokens=20", "--temperature=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    samples = p.stdout.split("---------------\n")
    first = samples[0].removesuffix("\n")
    assert first.startswith("the king") and len(first) == len("the king") + 20  # one character per token
    assert samples[1].removesuffix("\n") == first  # greedy: the same text twice
    p = subprocess.run([sys.executable, "export_hf.py", f"--out_dir={trained_run}", f"--hf_dir={tmp_path / 'hf'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    import checkpoint

    state = checkpoint.read_state(checkpoint.find(trained_run))
    ours = GPT(ModelConfig(**state["model_config"]))
    ours.load_state_dict(torch.load(os.path.join(trained_run, "ckpt", "model.pt"), weights_only=True))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 19, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours.eval()(idx)[0], atol=1e-5, rtol=0)
    for args, message in (([f"--hf_dir={tmp_path / 'x'}", "--out_dir=/nope"], "no checkpoint in /nope"),
                          ([], "pass --hf_dir")):
        p = subprocess.run([sys.executable, "export_hf.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        _assert_clean_error(p, message)
