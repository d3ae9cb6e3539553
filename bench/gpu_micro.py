"""
Kernel-level figures at a preset's shapes, to place a training step against the roofline: the
block GEMMs in bf16 and in fp8 (torch._scaled_mm, tensorwise and rowwise scales), and causal
attention through each SDPA backend, with enable_gqa and with K/V pre-expanded to every head.
One JSON line per measurement (forward+backward where it has one), TFLOP/s from the FLOPs it must do.

    python bench/gpu_micro.py config/full_llama3_1.5b_optimal.py --batch_size=8 --block_size=2048
    python bench/gpu_micro.py config/tiny_llama3.py --smoke=True      # CPU: runs everything tiny

Timing: CUDA events around `iters` calls after `warmup` calls, median of `rounds`; inputs are
random (never zeros). The loss variants are measured by bench/loss_bench.py.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configurator  # noqa: E402
import errors  # noqa: E402
from model import ModelConfig  # noqa: E402
from train_config import TrainConfig  # noqa: E402


@dataclass
class MicroConfig:
    iters: int = 20  # timed calls per round
    warmup: int = 5  # untimed calls first
    rounds: int = 3  # rounds; the median is reported
    smoke: bool = False  # everything tiny, on the CPU (the tests)
def timed(fn: Callable[[], object], cfg: MicroConfig, device: torch.device) -> float:
    """Median ms per call of fn."""
    for _ in range(cfg.warmup):
        fn()
    times = []
    for _ in range(cfg.rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(cfg.iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / cfg.iters)
        else:
            t0 = time.perf_counter()
            for _ in range(cfg.iters):
                fn()
            times.append(1000 * (time.perf_counter() - t0) / cfg.iters)
    return statistics.median(times)


def gemm_shapes(mc: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """name -> (M tokens, K in, N out) of each linear in a block, and the head."""
    q, kv = mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim
    ff = mc.intermediate_size * (2 if mc.gated_mlp else 1)
    return {"attn.c_attn": (tokens, mc.n_embd, q + 2 * kv), "attn.c_proj": (tokens, q, mc.n_embd),
            "mlp.c_fc": (tokens, mc.n_embd, ff), "mlp.c_proj": (tokens, mc.intermediate_size, mc.n_embd),
            "head": (tokens, mc.n_embd, mc.vocab_size)}


def fp8_gemm(a: torch.Tensor, b_t: torch.Tensor, rowwise: bool) -> Callable[[], torch.Tensor]:
    """a (M, K) @ b_t.T (N, K)^T in float8 e4m3 with bf16 output, tensorwise or rowwise scales."""
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b_t.to(torch.float8_e4m3fn).t()  # (K, N), column-major as _scaled_mm wants
    if rowwise:
        sa = torch.ones(a.size(0), 1, device=a.device)
        sb = torch.ones(1, b_t.size(0), device=a.device)
    else:
        sa = sb = torch.ones((), device=a.device)
    return lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                    use_fast_accum=not rowwise)


def run(argv: list[str]) -> list[dict]:
    (tc, mc, cfg), _ = configurator.load(argv, [TrainConfig, ModelConfig, MicroConfig], __doc__)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    if cfg.smoke:
        cfg.iters, cfg.warmup, cfg.rounds = 1, 1, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = tc.batch_size * tc.block_size
    out = []
    base = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "architecture": mc.arch_string, "batch_size": tc.batch_size, "seq": tc.block_size}
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    fp8_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    for name, (m, k, n) in gemm_shapes(mc, tokens).items():
        a, w = rand(m, k), rand(n, k)
        flops = 2 * m * k * n
        ms = timed(lambda a=a, w=w: a @ w.t(), cfg, device)
        out.append({**base, "kind": "gemm", "name": name, "M": m, "K": k, "N": n, "dtype": str(dtype)[6:],
                    "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
        if fp8_ok and k % 16 == 0 and n % 16 == 0:
            for rowwise in (False, True):
                ms8 = timed(fp8_gemm(a, w, rowwise), cfg, device)
                out.append({**base, "kind": "gemm", "name": name, "M": m, "K": k, "N": n,
                            "dtype": "fp8 rowwise" if rowwise else "fp8 tensorwise", "ms": round(ms8, 4),
                            "tflops": round(flops / ms8 / 1e9, 1), "speedup_vs_bf16": round(ms / ms8, 3)})

    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, hd = tc.batch_size, tc.block_size, mc.head_dim
    backends = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"] if device.type == "cuda" else ["MATH"]
    # causal: half of the T x T scores; forward 2 matmuls, backward 5 (x 2 FLOPs each)
    attn_flops = 2 * 2 * B * mc.n_head * T * T * hd * (1 + 2.5) / 2
    groups = mc.n_head // mc.n_kv_head
    for backend in backends:
        for layout in (["enable_gqa", "expanded"] if groups > 1 else ["mha"]):
            q = rand(B, mc.n_head, T, hd).requires_grad_()
            n_kv = mc.n_kv_head if layout == "enable_gqa" else mc.n_head
            k, v = rand(B, n_kv, T, hd).requires_grad_(), rand(B, n_kv, T, hd).requires_grad_()
            grad = rand(B, mc.n_head, T, hd)

            def fwd_bwd(q=q, k=k, v=v, grad=grad, gqa=layout == "enable_gqa", backend=backend) -> None:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                y.backward(grad)

            record = {**base, "kind": "sdpa", "backend": backend, "layout": layout, "heads": mc.n_head,
                      "kv_heads": n_kv, "head_dim": hd}
            try:
                ms = timed(fwd_bwd, cfg, device)
                record |= {"ms": round(ms, 4), "tflops": round(attn_flops / ms / 1e9, 1)}
            except RuntimeError as e:  # the backend refuses this shape/dtype/layout
                record |= {"ms": None, "error": str(e).splitlines()[0][:200]}
            out.append(record)
    return out


def main(argv: list[str]) -> int:
    def body() -> int:
        for record in run(argv):
            print(json.dumps(record), flush=True)
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
