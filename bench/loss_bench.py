"""Time and peak memory of the output-head loss, forward + backward, at one (N, d, V).

Compares loss.py's fused loss (each variant of loss.LOSS_VARIANTS) with F.linear + F.cross_entropy
and with Liger's fused linear cross-entropy when liger_kernel is importable. One JSON line per
measurement, ratios against F.linear + F.cross_entropy in the same process.

    python bench/loss_bench.py                       # N=16384 d=2048 V=128256, bf16 on CUDA
    python bench/loss_bench.py --device=cpu --N=2048 --d=256 --V=8192 --dtype=float32
    python bench/loss_bench.py --variants=scatter,where --compile   # two variants, compiled
    python bench/loss_bench.py --smoke                # tiny shapes, CPU, end to end (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import errors  # noqa: E402
from loss import _ADDMM_OUT_DTYPE, LOSS_VARIANTS, linear_cross_entropy, loss_chunk_tokens  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def reference_loss(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F.linear + F.cross_entropy on the full (N, V) logits, fp32 softmax."""
    return F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-1)


def liger_loss() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Liger's fused linear cross-entropy, or None when liger_kernel is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, ignore_index=-1)


def measure(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor,
    warmup: int,
    iters: int,
) -> tuple[float, float | None, torch.Tensor]:
    """(ms per forward+backward, peak MiB above the inputs (None off CUDA), loss) of fn on fresh gradients."""
    cuda = x.is_cuda

    def step() -> torch.Tensor:
        x.grad = w.grad = None
        loss = fn(x, w, t)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    x.grad = w.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1000 / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return ms, peak, loss.detach()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = errors.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=16384, help="tokens")
    p.add_argument("--d", type=int, default=2048, help="model width")
    p.add_argument("--V", type=int, default=128256, help="vocabulary")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--variants", default=",".join(LOSS_VARIANTS), help="comma-separated LOSS_VARIANTS")
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: loss_chunk_tokens(V))")
    p.add_argument("--compile", action="store_true", help="torch.compile each loss function")
    p.add_argument("--iters", type=int, default=10, help="timed calls of each variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, 1 iteration")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.N, args.d, args.V, args.iters, args.warmup, args.device = 96, 32, 300, 1, 1, "cpu"
        args.chunk = args.chunk or 40  # several uneven chunks
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in LOSS_VARIANTS]
    if unknown:
        print(f"error: unknown --variants {','.join(unknown)}; choose from {','.join(LOSS_VARIANTS)}", file=sys.stderr)
        return 2
    if min(args.N, args.d, args.V, args.iters) <= 0 or args.warmup < 0 or args.chunk < 0:
        print("error: --N, --d, --V and --iters must be positive, --warmup and --chunk >= 0", file=sys.stderr)
        return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device=cuda but no CUDA device is visible; use --device=cpu", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    chunk = args.chunk or loss_chunk_tokens(args.V)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "threads": torch.get_num_threads(),
                "N": args.N, "d": args.d, "V": args.V, "dtype": str(dtype), "chunk": chunk, "compile": args.compile,
                "addmm_out_dtype": _ADDMM_OUT_DTYPE,
            }
        ),
        flush=True,
    )
    torch.manual_seed(0)
    # x in the activation dtype (as under autocast), the head weight an fp32 master cast per call
    x = (torch.randn(args.N, args.d, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(args.V, args.d, device=device) * 0.02).requires_grad_()
    t = torch.randint(0, args.V, (args.N,), device=device)
    t[:: 7] = -1  # some ignored positions

    def ref(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return reference_loss(x, w.to(x.dtype), t)

    candidates: dict[str, Callable] = {"F.linear+F.cross_entropy": ref}
    for v in variants:
        candidates[f"fused:{v}"] = lambda x, w, t, v=v: linear_cross_entropy(x, w, t, chunk, v)
    liger = liger_loss()
    if liger is not None and device == "cuda":
        candidates["liger"] = lambda x, w, t: liger(x, w.to(x.dtype), t)
    base_ms = base_loss = None
    for name, fn in candidates.items():
        if args.compile:
            fn = torch.compile(fn)
        try:
            ms, peak, loss = measure(fn, x, w, t, args.warmup, args.iters)
        except torch.OutOfMemoryError:
            print(json.dumps({"loss": name, "error": "out of memory"}), flush=True)
            torch.cuda.empty_cache()
            continue
        if base_ms is None:
            base_ms, base_loss = ms, loss
        row = {
            "loss": name,
            "ms": round(ms, 3),
            "peak_mib": None if peak is None else round(peak, 1),  # CUDA only
            "ms_ratio_vs_reference": round(ms / base_ms, 3),
            "loss_value": round(loss.item(), 6),
            "loss_abs_diff_vs_reference": float(f"{abs(loss.item() - base_loss.item()):.3g}"),
        }
        print(json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if liger is None:
        print(json.dumps({"loss": "liger", "skipped": "liger_kernel not installed"}), flush=True)
    elif device != "cuda":
        print(json.dumps({"loss": "liger", "skipped": "Liger's kernels are Triton, CUDA only"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_command(main))
