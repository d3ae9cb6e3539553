"""
Training-step speed and memory of one configuration, built by train.py's own build (build.build: the model
on the meta device, the FP8 transform and its hooks, parallel.wrap, the optimizer) and timed through
loop.train_step, the step every run takes (GradScaler, clipping and skipping included), on synthetic tokens:
no evaluation, no checkpoint, no data files. Prints one JSON line. Run one process per
configuration, so that an OOM or a compile failure ends only that line (bench/gpu_suite.sh does).

    python bench/gpu_step.py config/full_llama3_1.5b_optimal.py --batch_size=8 --gradient_accumulation_steps=1 \
        --compile=True --compile_mode=blocks --steps=30
    python bench/gpu_step.py config/tiny_llama3.py --smoke=True      # CPU, seconds: what the tests run

Bench flags (besides every train.py/model key): --steps (timed optimizer steps), --warmup (untimed
steps, compilation included), --data (synthetic: a fixed pool of random batches cycled, so the loss
must fall if the step trains; or a prepared dataset folder under data/), --pool (batches in the
synthetic pool), --sdpa (auto, flash, cudnn, efficient, math: restrict SDPA's kernels),
--gc_freeze (gc.freeze() after warm-up, as nanochat does), --smoke (tiny CPU run for tests).
Set PYTORCH_ALLOC_CONF=expandable_segments:True in the environment to compare allocators.

The JSON line: versions, GPU, shape, batch, accumulation, sequence, compile mode, graphs, fp8, the
SDPA kernel torch picks for this attention shape, compile seconds (first steps' wall time minus
steady-state), tokens/s, MFU, forward+backward and optimizer ms per step (CUDA events), peak
allocated and reserved GiB, the dry run's estimate and measured/estimate, first and last loss.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import build  # noqa: E402
import configurator  # noqa: E402
import errors  # noqa: E402
import fp8  # noqa: E402
import hardware  # noqa: E402
import loop  # noqa: E402
import parallel  # noqa: E402
import runlog  # noqa: E402
from model import ModelConfig  # noqa: E402
from train_config import TrainConfig  # noqa: E402

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


@dataclass
class BenchConfig:
    steps: int = 20  # timed optimizer steps
    warmup: int = 5  # untimed steps first, compilation included
    data: str = "synthetic"  # 'synthetic' (a fixed pool of random batches) or a prepared dataset folder
    pool: int = 8  # batches in the synthetic pool
    sdpa: str = "auto"  # auto, flash, cudnn, efficient or math: restrict SDPA's kernels
    gc_freeze: bool = False  # gc.freeze() after warm-up, as nanochat does
    smoke: bool = False  # a tiny CPU run, for the tests
    profile: str = ""  # a file: after timing, profile one more step and write the top kernels by GPU time there


def sdpa_choice(mc: ModelConfig, batch: int, seq: int, device: torch.device, dtype: torch.dtype,
                request: str = "auto") -> str:
    """The SDPA kernel torch picks for this model's attention call (GQA included) under --sdpa, by name."""
    if device.type != "cuda":
        return "cpu"
    q = torch.randn(batch, mc.n_head, seq, mc.head_dim, device=device, dtype=dtype)
    kv = torch.randn(batch, mc.n_kv_head, seq, mc.head_dim, device=device, dtype=dtype)
    with sdpa_context(request):  # the same restriction the timed steps run under
        choice = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=mc.n_kv_head != mc.n_head)
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper()}
    return names.get(int(choice), str(choice))


def sdpa_context(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


class Within:
    """Autocast and the --sdpa kernel restriction, entered together around each forward (Loop.autocast)."""

    def __init__(self, autocast: contextlib.AbstractContextManager, sdpa: str) -> None:
        self.autocast, self.sdpa = autocast, sdpa

    def __enter__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.autocast)
        self.stack.enter_context(sdpa_context(self.sdpa))

    def __exit__(self, *exc) -> bool | None:
        return self.stack.__exit__(*exc)


class Batches:
    """(x, y) micro-batches on the device: a fixed pool of random batches cycled, so the loss must fall if
    the step trains (--data=synthetic), or a prepared dataset's TokenLoader."""

    def __init__(self, bc: BenchConfig, tc: TrainConfig, mc: ModelConfig, d: parallel.Dist, accum: int) -> None:
        self.loader, self.pool, self.i = None, [], 0
        if bc.data != "synthetic":
            import token_loader

            self.loader = token_loader.TokenLoader(token_loader.resolve_data_dir(bc.data), "train", tc.block_size,
                                                   tc.batch_size, accum, d.rank, d.world_size, tc.seed,
                                                   mc.vocab_size, d.device)
            return
        g = torch.Generator(device="cpu").manual_seed(tc.seed)
        for _ in range(bc.pool):
            seq = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.block_size + 1), generator=g)
            self.pool.append((seq[:, :-1].to(d.device), seq[:, 1:].to(d.device)))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loader is not None:
            return self.loader.next_batch()
        self.i += 1
        return self.pool[(self.i - 1) % len(self.pool)]


def run(argv: list[str]) -> dict:
    (tc, mc, bc), explicit = configurator.load(argv, [TrainConfig, ModelConfig, BenchConfig], __doc__)
    if bc.sdpa != "auto" and bc.sdpa not in SDPA_BACKENDS:
        raise errors.ConfigError(f"sdpa={bc.sdpa!r} is not one of auto, {', '.join(SDPA_BACKENDS)}")
    if bc.smoke:  # a few eager steps of whatever (tiny) config on CPU: proves the script runs
        tc.device, bc.steps, bc.warmup = "cpu", min(bc.steps, 3), min(bc.warmup, 1)
        tc.compile = tc.compile and "compile" in explicit
    d = loop.start(tc.device)
    dtype = hardware.resolve_dtype(tc.dtype, d.device)
    if tc.fp8:
        fp8.check_supported(tc.fp8, d.device, tc.fp8_emulate)
    accum = tc.gradient_accumulation_steps // d.world_size
    model, train_model, optimizer, hooks, fp8_summary = build.build(tc, mc, d, dtype, ckpt_path=None)
    est = build.memory_estimate(model, tc, d.world_size, str(dtype).removeprefix("torch."))
    autocast, scaler = loop.precision(dtype, d.device)
    steps = loop.Loop(
        d, model, train_model, optimizer, Batches(bc, tc, mc, d, accum), runlog.RunLog("", False, {}), accum,
        max_iters=bc.warmup + bc.steps,
        lr_at=build.lr_at(tc),
        evaluate_and_save=lambda run, done: None, save=lambda run: None, after_step=hooks, grad_clip=tc.grad_clip,
        scaler=scaler, autocast=Within(autocast, bc.sdpa), use_cuda_graphs=tc.use_cuda_graphs)
    cuda = d.device.type == "cuda"
    run_state = loop.RunState()
    events: dict[str, list] = {"start": [], "fwd_bwd_end": [], "end": []}
    losses = []

    def step() -> None:
        events["start"].append(_event(cuda))
        losses.append(loop.train_step(steps, run_state, mark=lambda: events["fwd_bwd_end"].append(_event(cuda))).loss)
        events["end"].append(_event(cuda))

    t0 = time.perf_counter()
    for _ in range(bc.warmup):
        step()
    _sync(cuda)
    warmup_s = time.perf_counter() - t0
    if bc.gc_freeze:
        gc.collect()
        gc.freeze()
    if cuda:
        torch.cuda.reset_peak_memory_stats(d.device)
    for key in events:
        events[key].clear()
    t0 = time.perf_counter()
    for _ in range(bc.steps):
        step()
    _sync(cuda)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / bc.steps
    if bc.profile:
        profile_step(step, bc.profile, cuda)
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * tc.block_size
    tokens_per_sec = tokens_per_step / step_s
    peak, peak_note = hardware.peak_flops(hardware.device_name(d.device), str(dtype).removeprefix("torch."))
    fpt = model.flops_per_token(tc.block_size)
    fwd_bwd_ms = opt_ms = None
    if cuda:
        fwd_bwd_ms = statistics.median(s.elapsed_time(e) for s, e in zip(events["start"], events["fwd_bwd_end"]))
        opt_ms = statistics.median(s.elapsed_time(e) for s, e in zip(events["fwd_bwd_end"], events["end"]))
    peak_alloc = torch.cuda.max_memory_allocated(d.device) / 1024**3 if cuda else None
    result = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": hardware.device_name(d.device), "world_size": d.world_size,
        "architecture": mc.arch_string, "n_params": model.num_params(), "flops_per_token": fpt,
        "batch_size": tc.batch_size, "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "seq": tc.block_size, "dtype": str(dtype).removeprefix("torch."), "compile": tc.compile,
        "compile_mode": tc.compile_mode if tc.compile else None, "cuda_graphs": tc.use_cuda_graphs,
        "fp8": tc.fp8 or None, "fp8_linears": fp8_summary, "sdpa": bc.sdpa,
        "sdpa_choice": sdpa_choice(mc, tc.batch_size, tc.block_size, d.device, dtype, bc.sdpa),
        "parallelism": parallel.layout(d, zero1=tc.use_zero1, fsdp=tc.use_fsdp).name,
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "gc_freeze": bc.gc_freeze, "data": bc.data, "steps": bc.steps, "warmup": bc.warmup,
        "compile_s": round(max(0.0, warmup_s - bc.warmup * step_s), 2),
        "step_ms": round(1000 * step_s, 2), "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": hardware.mfu(fpt, tokens_per_sec, d.world_size, peak), "mfu_note": peak_note,
        "fwd_bwd_ms": fwd_bwd_ms and round(fwd_bwd_ms, 2), "optimizer_ms": opt_ms and round(opt_ms, 2),
        "peak_allocated_gib": peak_alloc and round(peak_alloc, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(d.device) / 1024**3, 3) if cuda else None,
        "estimate_gib": round(est["total_gb"], 3),
        "measured_over_estimate": peak_alloc and round(peak_alloc / est["total_gb"], 3),
        "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
        "argv": argv,
    }
    return result


def profile_step(fn, path: str, cuda: bool) -> None:
    """Profile one call of fn; write the 30 kernels with the most GPU time to path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(cuda)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90))


def _event(cuda: bool):
    if not cuda:
        return None
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    def body() -> int:
        print(json.dumps(run(argv)), flush=True)
        return 0

    return errors.run_command(body, cleanup=loop.finish)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
