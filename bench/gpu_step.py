"""
Training-step speed and memory of one configuration, built from train.py's own pieces (the same
model build, FP8 transform, parallel.wrap, optimizer, clipping and step), on synthetic tokens:
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

import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configurator  # noqa: E402
import fp8  # noqa: E402
import hardware  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
from model import ModelConfig  # noqa: E402

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


@dataclass
class BenchConfig:
    steps: int = 20
    warmup: int = 5
    data: str = "synthetic"
    pool: int = 8
    sdpa: str = "auto"
    gc_freeze: bool = False
    smoke: bool = False
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
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def batches(bc: BenchConfig, tc: train.TrainConfig, mc: ModelConfig, d: parallel.Dist, accum: int):
    """An endless iterator of (x, y) micro-batches on the device."""
    if bc.data != "synthetic":
        import token_loader

        loader = token_loader.TokenLoader(token_loader.resolve_data_dir(bc.data), "train", tc.block_size,
                                          tc.batch_size, accum, d.rank, d.world_size, tc.seed, mc.vocab_size,
                                          d.device)
        while True:
            yield loader.next_batch()
    g = torch.Generator(device="cpu").manual_seed(tc.seed)
    pool = []
    for _ in range(bc.pool):
        seq = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.block_size + 1), generator=g)
        pool.append((seq[:, :-1].to(d.device), seq[:, 1:].to(d.device)))
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def run(argv: list[str]) -> dict:
    (tc, mc, bc), explicit = configurator.load(argv, [train.TrainConfig, ModelConfig, BenchConfig])
    if bc.sdpa != "auto" and bc.sdpa not in SDPA_BACKENDS:
        raise configurator.ConfigError(f"sdpa={bc.sdpa!r} is not one of auto, {', '.join(SDPA_BACKENDS)}")
    if bc.smoke:  # a few eager steps of whatever (tiny) config on CPU: proves the script runs
        tc.device, bc.steps, bc.warmup = "cpu", min(bc.steps, 3), min(bc.warmup, 1)
        tc.compile = tc.compile and "compile" in explicit
    d = parallel.setup(tc.device)
    dtype = train.resolve_dtype(tc.dtype, d.device)
    if tc.fp8:
        fp8.check_supported(tc.fp8, d.device, tc.fp8_emulate)
    accum = tc.gradient_accumulation_steps // d.world_size
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(tc.seed)
    model = train.build_model(tc, mc, d.device, None)
    est = hardware.estimate_memory(model, tc.batch_size, tc.block_size, str(dtype).removeprefix("torch."),
                                   d.world_size, tc.use_zero1, tc.use_fsdp, tc.compile,
                                   tc.gradient_accumulation_steps // d.world_size, tc.use_cuda_graphs)
    fp8_summary = fp8.summary(fp8.convert(model, tc.fp8, tc.fp8_emulate, fsdp=tc.use_fsdp)) if tc.fp8 else None
    train_model = parallel.wrap(model, d, fsdp=tc.use_fsdp, compile=tc.compile, cuda_graphs=tc.use_cuda_graphs,
                                dtype=dtype, compile_mode=tc.compile_mode)
    optimizer = parallel.build_optimizer(model, d, zero1=tc.use_zero1, lr=tc.learning_rate,
                                         betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.use_cuda_graphs:
        for p in params:
            p.grad = torch.zeros_like(p)
    autocast = torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32)
    data = batches(bc, tc, mc, d, accum)
    cuda = d.device.type == "cuda"
    fsdp_fp8_scales = tc.use_fsdp and tc.fp8 and fp8.uses_fsdp_float8_all_gather(model)

    def step(it: int) -> torch.Tensor:
        lr = train.get_lr(it, tc.learning_rate, tc.warmup_iters, tc.lr_decay_iters, tc.min_lr, tc.decay_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = next(data)
            with parallel.no_sync(train_model, sync=micro == accum - 1):
                if tc.use_cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast, sdpa_context(bc.sdpa):
                    _, loss = train_model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        events["fwd_bwd_end"].append(_event(cuda))
        grad_norm = parallel.clip_grad_norm(params, tc.grad_clip)
        bad = ~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)
        parallel.optimizer_step(optimizer, parallel.all_reduce_max(bad.float(), d))
        if fsdp_fp8_scales:
            fp8.precompute_fsdp_scales(model)
        optimizer.zero_grad(set_to_none=not tc.use_cuda_graphs)
        return loss_sum

    events: dict[str, list] = {"start": [], "fwd_bwd_end": [], "end": []}
    losses = []
    t0 = time.perf_counter()
    for it in range(bc.warmup):
        events["start"].append(_event(cuda))
        losses.append(step(it))
        events["end"].append(_event(cuda))
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
    for it in range(bc.warmup, bc.warmup + bc.steps):
        events["start"].append(_event(cuda))
        losses.append(step(it))
        events["end"].append(_event(cuda))
    _sync(cuda)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / bc.steps
    if bc.profile:
        profile_step(lambda: step(bc.warmup + bc.steps), bc.profile, cuda)
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
        "parallelism": "fsdp" if tc.use_fsdp else "zero1" if tc.use_zero1 else "ddp" if d.world_size > 1 else "single",
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
    try:
        print(json.dumps(run(argv)), flush=True)
        return 0
    except train.user_errors() as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        parallel.teardown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
