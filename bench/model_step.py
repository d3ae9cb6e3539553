"""
Tokens/s of one training step (forward, backward, AdamW) of our model against the Hugging Face
transformers model holding identical weights, in one process, as a ratio.

    python bench/model_step.py config/tiny_llama3.py --n_layer=8 --n_embd=512 --vocab_size=32000 \
        --batch_size=4 --block_size=256
    python bench/model_step.py config/full_llama3_1.5b_optimal.py --n_layer=4 --device=cuda \
        --dtype=bfloat16 --compile=True        # on a GPU

Bench-only flags: --steps (timed steps per round, default 5), --rounds (default 3), --warmup (2).
Ours is built by train.py's own build (build.build_model, from scratch), and both sides step the AdamW
train.py builds (optim.build_optimizer with the config's lr, betas and weight decay). The two models are
timed one after the other (ours, then HF built from the same weights), with
only one of them on the device at a time so that a 1.5B comparison fits in 80 GB; the median round
is reported. The HF model uses attn_implementation="sdpa"; --compile compiles both.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import build  # noqa: E402
import configurator  # noqa: E402
import errors  # noqa: E402
import hf_checkpoint  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from train_config import TrainConfig  # noqa: E402


@dataclass
class BenchFlags:
    steps: int = 5  # timed steps per round
    rounds: int = 3  # rounds per model; the median is reported
    warmup: int = 2  # untimed steps before the rounds


def hf_twin(model: GPT):
    """A transformers model with the same weights as ours."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = hf_checkpoint.config_to_hf(model.config, torch.float32)
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    config = AutoConfig.for_model(model_type, **hf_cfg)
    config._attn_implementation = "sdpa"
    hf = AutoModelForCausalLM.from_config(config)
    hf.load_state_dict(hf_checkpoint.state_dict_to_hf(model), strict=False)
    return hf


def make_step(model: torch.nn.Module, is_ours: bool, device: str, dtype: torch.dtype, tc: TrainConfig):
    d = parallel.Dist(0, 0, 1, torch.device(device))
    opt = optim.build_optimizer(model, d, zero1=False, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                                weight_decay=tc.weight_decay)  # AdamW on both sides (Muon's groups are our names)
    fwd = torch.compile(model) if tc.compile else model
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            if is_ours:
                _, loss = fwd(x, y)
            else:
                loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(step, x: torch.Tensor, y: torch.Tensor, device: str, bench: dict) -> list[float]:
    """Seconds per step in each round, after the warm-up steps (compilation included there)."""
    for _ in range(bench["warmup"]):
        step(x, y)
    times = []
    for _ in range(bench["rounds"]):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(bench["steps"]):
            step(x, y)
        sync(device)
        times.append((time.perf_counter() - t0) / bench["steps"])
    return times


def main(argv: list[str]) -> None:
    (tc, mc, flags), _ = configurator.load(argv, [TrainConfig, ModelConfig, BenchFlags], __doc__)
    bench = asdict(flags)
    device = (
        "cuda"
        if tc.device == "auto" and torch.cuda.is_available()
        else ("cpu" if tc.device == "auto" else tc.device)
    )
    dtype = {
        "auto": torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[tc.dtype]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    ours = build.build_model(tc, mc, torch.device("cpu"), ckpt_path=None)
    B, T = tc.batch_size, tc.block_size
    x = torch.randint(0, mc.vocab_size, (B, T), device=device)
    y = torch.randint(0, mc.vocab_size, (B, T), device=device)
    probe = x[:1, : min(T, 128)]
    with torch.no_grad():  # the same function before we time anything (on CPU: both fit there)
        hf = hf_twin(ours)
        diff = (ours(probe.cpu())[0] - hf(input_ids=probe.cpu()).logits).abs().max().item()
        del hf
    # One model on the device at a time (at 1.5B each needs ~25 GB with AdamW): ours, then HF.
    times, peak = {}, {}
    for name in ("ours", "hf"):
        model = ours.to(device) if name == "ours" else hf_twin(ours.cpu()).to(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times[name] = timed_rounds(make_step(model, name == "ours", device, dtype, tc), x, y, device, bench)
        peak[name] = torch.cuda.max_memory_allocated() / 1024**3 if device.startswith("cuda") else None
        if name == "ours":
            ours.cpu()
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        torch._dynamo.reset()

    tok = {k: B * T / statistics.median(v) for k, v in times.items()}
    print(f"model: {mc.arch_string}, {ours.num_params():,} params, vocab {mc.vocab_size}")
    print(
        f"device: {device} ({torch.get_num_threads()} threads), dtype: {tc.dtype}, compile: {tc.compile}, "
        f"batch {B} x seq {T}, torch {torch.__version__}"
    )
    print(f"max |logits diff| before timing: {diff:.2e}")
    for name in times:
        mem = f", peak {peak[name]:.1f} GiB" if peak[name] is not None else ""
        print(f"{name:>5}: {tok[name]:10,.0f} tokens/s  ({1000 * statistics.median(times[name]):.1f} ms/step{mem})")
    print(f"ratio ours/hf: {tok['ours'] / tok['hf']:.2f}x")


if __name__ == "__main__":
    sys.exit(errors.run_command(lambda: main(sys.argv[1:]) or 0))
