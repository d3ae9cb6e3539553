"""
Generation tokens/s of generation.generate with the KV cache against the uncached loop, in one process, as a ratio.

    python bench/generate_bench.py config/tiny_llama3.py --n_layer=8 --n_embd=512 --vocab_size=32000 \\
        --batch_size=4 --prompt_len=128 --new_tokens=128
    python bench/generate_bench.py --smoke      # a few tokens on tiny_llama3, for the test suite

Bench-only flags: --prompt_len (default 64), --new_tokens (64), --rounds (3), --smoke. The model's
block_size is raised to fit prompt_len + new_tokens. Both routes decode greedily from the same random
prompts (their tokens are checked equal first: the exit status is 1 if they differ in float32; in
bfloat16, --dtype's GPU default, the share of equal new tokens is reported), in alternating rounds; the
median round is reported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configurator  # noqa: E402
import errors  # noqa: E402
from generation import generate  # noqa: E402
from hardware import resolve_dtype  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from train_config import TrainConfig  # noqa: E402


@dataclass
class BenchFlags:
    prompt_len: int = 64  # prompt tokens per sequence
    new_tokens: int = 64  # tokens generated per sequence
    rounds: int = 3  # alternating rounds of both routes; the median is reported


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    rest = [a for a in argv if a != "--smoke"]
    if smoke:
        rest = ["config/tiny_llama3.py", "--batch_size=2"] + rest
    (tc, mc, flags), _ = configurator.load(rest, [TrainConfig, ModelConfig, BenchFlags], __doc__)
    bench = asdict(flags)
    if smoke:
        bench.update(prompt_len=8, new_tokens=8, rounds=1)
    mc.block_size = max(mc.block_size, bench["prompt_len"] + bench["new_tokens"])
    device = "cuda" if tc.device == "auto" and torch.cuda.is_available() else (
        "cpu" if tc.device == "auto" else tc.device)
    dtype = resolve_dtype(tc.dtype, torch.device(device))  # 'auto': bfloat16 on a GPU, as inference runs
    torch.manual_seed(0)
    model = GPT(mc).to(device=device, dtype=dtype).eval()
    B, T, N = tc.batch_size, bench["prompt_len"], bench["new_tokens"]
    prompt = torch.randint(0, mc.vocab_size, (B, T), device=device)

    def run(use_cache: bool) -> torch.Tensor:
        return generate(model, prompt, N, temperature=0, use_cache=use_cache)

    cached, uncached = run(True), run(False)  # also the warmup
    same = torch.equal(cached, uncached)
    agree = (cached[:, T:] == uncached[:, T:]).float().mean().item()
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    for _ in range(bench["rounds"]):
        for name in times:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(name == "cached")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    tok = {k: B * N / statistics.median(v) for k, v in times.items()}
    print(f"model: {mc.arch_string}, {model.num_params():,} params, vocab {mc.vocab_size}")
    print(f"device: {device} ({torch.get_num_threads()} threads), batch {B}, prompt {T}, new tokens {N}, "
          f"torch {torch.__version__}")
    print(f"dtype {str(dtype).removeprefix('torch.')}: cached tokens equal uncached: {same} "
          f"({agree:.1%} of new tokens agree)")
    for name in times:
        print(f"{name:>8}: {tok[name]:10,.1f} tokens/s")
    print(f"KV cache speedup (cached/uncached): {tok['cached'] / tok['uncached']:.2f}x")
    # fp32 must agree token for token; in bf16 the two routes round differently (other matmul shapes)
    # and greedy decoding amplifies a near-tie into a different continuation, so that is reported only
    return 0 if same or dtype != torch.float32 else 1


if __name__ == "__main__":
    sys.exit(errors.run_command(lambda: main(sys.argv[1:])))
