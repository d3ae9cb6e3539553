"""
Train a GPT-2, LLaMA-2, LLaMA-3 or Qwen3 model, from one CPU to many GPUs.

    python train.py config/train_shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py config/full_qwen3_1.8b_optimal.py --use_zero1=True

Every default lives in TrainConfig below or in model.ModelConfig; a config file (Python
assignments) and --key=value overrides are checked against both (configurator.py).

The story of a run: resolve the config -> join the process group (parallel.py) -> build the raw
`model` (scratch, checkpoint or Hugging Face weights) -> wrap it into `train_model` (compile,
DDP/ZeRO-1/FSDP) -> restore optimizer, RNG and loader state on resume -> loop: evaluate and
checkpoint at intervals, accumulate gradients over micro-steps, clip, step (skipping non-finite
steps on device), and log at log intervals, which are the only host syncs of the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import checkpoint
import configurator
import fp8
import hardware
import parallel
from model import GPT, ModelConfig

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    """How a run is trained. Shapes of the model live in ModelConfig; block_size is shared by both."""

    # I/O and logging
    out_dir: str = "out"
    dataset: str = "shakespeare_char"  # folder under data/ (or a path) with train/val shards and meta.json
    eval_interval: int = 250  # iterations between evaluations (and checkpoint saves)
    eval_iters: int = 20  # global batches of fixed validation windows per evaluation
    log_interval: int = 10  # iterations between log records (the only host syncs of the loop)
    gradient_log_interval: int = 0  # iterations between per-layer gradient-norm records; 0: never
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir/ckpt), or a Hugging Face model folder
    eval_only: bool = False  # evaluate once, write the run log, change no checkpoint, exit
    dry_run: bool = False  # print shapes, FLOPs and a memory estimate without reading data
    wandb_log: bool = False
    wandb_project: str = "nanollm"
    wandb_run_name: str = "run"
    tensorboard_log: bool = False
    # batch
    batch_size: int = 12  # sequences per rank per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step summed over ranks (divided by world size)
    block_size: int = 1024  # training sequence length
    # optimizer and schedule
    learning_rate: float = 6e-4
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    decay_lr: bool = True  # False: constant learning_rate after warmup
    warmup_iters: int = 200
    lr_decay_iters: int | None = None  # end of the cosine decay; None: max_iters
    min_lr: float = 6e-5
    max_nonfinite_steps: int = 5  # consecutive skipped (NaN/inf loss or gradient) steps before stopping
    # system
    device: str = "auto"  # 'auto' (cuda:LOCAL_RANK if a GPU is present, else cpu), 'cpu', 'cuda', 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on GPUs that support it, else float32), 'bfloat16', 'float16', 'float32'
    compile: bool = True
    compile_mode: str = "model"  # 'model': one graph (around DDP); 'blocks': each Block + the loss apart (faster compile)
    fp8: str = ""  # '' (off), 'tensorwise' or 'rowwise': torchao float8 block linears (needs an sm_89+ GPU)
    fp8_emulate: bool = False  # run fp8 in emulation (CPU tests of the numerics; slow, not for training)
    use_zero1: bool = False  # shard AdamW state over data-parallel ranks
    use_fsdp: bool = False  # FSDP2: shard parameters, gradients and optimizer state
    use_cuda_graphs: bool = False  # capture the compiled step in CUDA graphs (GPU, static shapes)
    use_dataloader: bool = False  # read batches in DataLoader worker processes (pinned memory on GPU)
    dataloader_num_workers: int = 4
    seed: int = 1337
    save_checkpoint: bool = True  # False: never write a checkpoint (benchmarks); eval and logs are unchanged

    def __post_init__(self) -> None:
        for name in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps",
                     "block_size", "max_iters", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("gradient_log_interval", "warmup_iters", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        if self.lr_decay_iters <= 0:
            raise ValueError(f"lr_decay_iters={self.lr_decay_iters} must be > 0")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.learning_rate == 0:
            raise ValueError("learning_rate=0 would not train; set a positive learning_rate")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} exceeds learning_rate={self.learning_rate}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype={self.dtype!r} is not one of auto, bfloat16, float16, float32")
        if self.use_zero1 and self.use_fsdp:
            raise ValueError("use_zero1 and use_fsdp are mutually exclusive: FSDP already shards the optimizer state")
        if self.use_cuda_graphs and not self.compile:
            raise ValueError("use_cuda_graphs=True needs compile=True (torch.compile captures the graphs)")
        if self.compile_mode not in ("model", "blocks"):
            raise ValueError(f"compile_mode={self.compile_mode!r} is not one of model, blocks")
        if self.use_cuda_graphs and self.use_fsdp:
            raise ValueError("use_cuda_graphs=True does not work with use_fsdp=True (FSDP's collectives and "
                             "per-block graphs are not captured together); drop one of them")
        if self.use_cuda_graphs and self.compile_mode == "blocks":
            raise ValueError("use_cuda_graphs=True captures the whole model: use compile_mode=model")
        if self.fp8 not in ("", "tensorwise", "rowwise"):
            raise ValueError(f"fp8={self.fp8!r} is not one of '' (off), tensorwise, rowwise")
        if self.fp8_emulate and not self.fp8:
            raise ValueError("fp8_emulate=True needs fp8=tensorwise or fp8=rowwise")


@dataclass
class RunState:
    """What a checkpoint must carry to continue exactly: progress and the best val loss."""

    iter_num: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    best_val_loss: float = float("inf")


class TrainingError(ValueError):
    """A run that cannot start or go on; the message is one line naming the fix."""


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float,
           decay_lr: bool = True) -> float:
    """Linear warmup from learning_rate / (warmup_iters + 1) to learning_rate, then cosine to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def parse_config(argv: list[str]) -> tuple[TrainConfig, ModelConfig, set[str]]:
    """Resolve `[CONFIG.py] [--key=value ...]` into the two typed configs and the explicitly set keys."""
    (train_cfg, model_cfg), explicit = configurator.load(argv, [TrainConfig, ModelConfig])
    return train_cfg, model_cfg, explicit


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


# Model fields a resumed or Hugging Face run may change: they alter how, not what, is computed.
RUNTIME_MODEL_KEYS = {"attention_backend", "dropout"}


def resolve_model_config(tc: TrainConfig, mc: ModelConfig, explicit: set[str], meta: dict | None,
                         ckpt_state: dict | None) -> ModelConfig:
    """The architecture to build: from the checkpoint (resume), the HF folder, or the config."""
    runtime = {k: getattr(mc, k) for k in RUNTIME_MODEL_KEYS if k in explicit}
    if ckpt_state is not None:
        base = ModelConfig(**ckpt_state["model_config"])
        source = "the checkpoint"
    elif tc.init_from != "scratch":
        import hf_checkpoint

        base = hf_checkpoint.hf_to_config(hf_checkpoint.read_config(tc.init_from))
        source = f"the Hugging Face folder {tc.init_from}"
    else:
        if "vocab_size" not in explicit and meta is not None:
            mc.vocab_size = -(-meta["vocab_size"] // 64) * 64  # the dataset's vocabulary, padded to 64
        return mc
    for key in explicit & set(asdict(base)) - RUNTIME_MODEL_KEYS - {"block_size"}:
        if getattr(mc, key) != getattr(base, key):
            raise TrainingError(
                f"{key}={getattr(mc, key)} in your config disagrees with {source} ({key}={getattr(base, key)}); "
                "drop the override, or use another out_dir to train a new shape"
            )
    return ModelConfig(**{**asdict(base), **runtime})


def build_model(tc: TrainConfig, mc: ModelConfig, device: torch.device, ckpt_path: str | None) -> GPT:
    """The raw model on device: initialised (scratch), or holding checkpoint / Hugging Face weights."""
    if ckpt_path is not None:
        return checkpoint.load_model(ckpt_path, mc).to(device)
    if tc.init_from != "scratch":
        overrides = {k: getattr(mc, k) for k in RUNTIME_MODEL_KEYS}
        import hf_checkpoint

        return hf_checkpoint.from_hf(tc.init_from, dtype=torch.float32, **overrides).to(device)
    with torch.device("meta"):
        model = GPT(mc)
    model.to_empty(device=device)
    model.init_weights()  # the same seed on every rank: identical replicas before sharding
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: dict[str, list], autocast, d: parallel.Dist) -> dict[str, float]:
    """Mean loss over each split's fixed batches and over ranks."""
    model.eval()
    out = {}
    for split, split_batches in batches.items():
        losses = torch.zeros(len(split_batches), device=d.device)
        for i, (x, y) in enumerate(split_batches):
            with autocast:
                _, loss = model(x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True))
            losses[i] = loss
        out[split] = parallel.all_reduce_mean(losses.mean(), d).item()
    model.train()
    return out


def print0(d: parallel.Dist, *args: object) -> None:
    if d.is_master:
        print(*args, flush=True)


def dry_run(tc: TrainConfig, mc: ModelConfig) -> dict:
    """Shapes, FLOPs and a memory estimate from the meta device; reads no data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.gradient_accumulation_steps % world:
        raise TrainingError(
            f"gradient_accumulation_steps={tc.gradient_accumulation_steps} is not divisible by the world size {world}"
        )
    if tc.init_from not in ("scratch", "resume"):
        mc = resolve_model_config(tc, mc, set(), None, None)
    with torch.device("meta"):
        model = GPT(mc)
    dtype = "bfloat16" if tc.dtype == "auto" else tc.dtype
    mem = hardware.estimate_memory(model, tc.batch_size, tc.block_size, dtype, world, tc.use_zero1, tc.use_fsdp,
                                   tc.compile, tc.gradient_accumulation_steps // world, tc.use_cuda_graphs)
    per_rank = tc.gradient_accumulation_steps // world
    tokens = tc.batch_size * tc.gradient_accumulation_steps * tc.block_size
    parallelism = "FSDP" if tc.use_fsdp else "ZeRO-1" if tc.use_zero1 else "DDP" if world > 1 else "single process"
    print(f"architecture: {mc.arch_string} ({mc.norm}, {mc.mlp}, {mc.position_embedding}, attention {mc.attention_backend})")
    print(f"parameters: {model.num_params():,} total, {model.num_params(non_embedding=True):,} non-embedding")
    fp8_plan = None
    if tc.fp8:
        fp8_plan = fp8.plan(model, tc.fp8, tc.fp8_emulate)
        print(f"fp8 {tc.fp8}{' (emulated)' if tc.fp8_emulate else ''}: {fp8.summary(fp8_plan)}")
    print(f"FLOPs per token (fwd+bwd, seq {tc.block_size}): {model.flops_per_token(tc.block_size):.4g}")
    print(f"world size {world} ({parallelism}); gradient accumulation {tc.gradient_accumulation_steps} total = "
          f"{per_rank} per rank; tokens per optimizer step: {tc.batch_size} x {tc.gradient_accumulation_steps} x "
          f"{tc.block_size} = {tokens:,}")
    print(f"estimated memory per GPU ({dtype}, batch {tc.batch_size} x {tc.block_size}, "
          f"{'compiled' if tc.compile else 'eager'}): weights {mem['weights_gb']:.2f} GiB, grads {mem['grads_gb']:.2f}, "
          f"optimizer {mem['optimizer_gb']:.2f}, activations {mem['activations_gb']:.2f}, "
          f"loss buffers {mem['loss_buffers_gb']:.2f}; total {mem['total_gb']:.2f} GiB (+ CUDA context)")
    summary = {
        "architecture": mc.arch_string,
        "n_params": model.num_params(),
        "n_params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(tc.block_size),
        "tokens_per_step": tokens,
        "world_size": world,
        "gradient_accumulation_per_rank": per_rank,
        "est_memory_gb_per_gpu": round(mem["total_gb"], 3),
        "est_memory_breakdown_gb": {k: round(v, 3) for k, v in mem.items() if k != "total_gb"},
    }
    if fp8_plan is not None:
        summary["fp8_linears"] = sorted(k for k, v in fp8_plan.items() if v == "fp8")
    print(json.dumps(summary))
    return summary


@dataclass
class Loop:
    """What the shared training loop runs: the pieces a caller built, and its seams as callbacks.

    train() below fills it for pretraining; finetune/train.py fills it for LoRA (a LoRA model, an SFT
    loader, an answer-accuracy evaluator, an adapter-only checkpoint, a spectral refactor after steps).
    """

    d: parallel.Dist
    model: torch.nn.Module  # the raw module (saving, eval, hooks)
    train_model: torch.nn.Module  # the compiled/wrapped module the steps run
    optimizer: torch.optim.Optimizer  # over the trainable parameters only
    loader: object  # next_batch() -> (x, y) on device; TokenLoader's interface
    log: object  # runlog.RunLog
    accum: int  # micro-steps per rank per optimizer step
    max_iters: int
    lr_at: Callable[[int], float]  # learning rate of optimizer step `it`
    # before every step and once at the end (done=True): evaluate and checkpoint as the caller decides;
    # its wall time is excluded from the speed figures
    maintenance: Callable[[RunState, bool], None]
    save: Callable[[RunState], None]  # checkpoint now (on Ctrl-C/SIGTERM)
    after_step: Callable[[RunState], None] | None = None  # after each optimizer step (e.g. a spectral refactor)
    grad_clip: float = 1.0
    scaler: torch.amp.GradScaler | None = None
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    use_cuda_graphs: bool = False
    fsdp_fp8_scales: bool = False  # FSDP with float8 all-gather: refresh the scales after each step
    timing_warmup: int = 1  # steps excluded from speed figures (compilation, graph capture)
    log_interval: int = 10
    gradient_log_interval: int = 0
    max_nonfinite_steps: int = 5
    flops_per_token: int = 0
    peak_flops: float | None = None
    resume_hint: str = ""  # how to continue after an interrupt, printed with it


def run_loop(loop: Loop, run: RunState) -> int:
    """Step, accumulate, clip, skip non-finite steps, log, and call the seams until run.iter_num == max_iters.

    Returns 0 when done, 130 when interrupted (after a checkpoint). Tokens per step are counted from
    the batches (x.numel() per micro-batch, times the world size), so padded SFT batches count too.
    """
    import runlog

    d, model, optimizer, scaler = loop.d, loop.model, loop.optimizer, loop.scaler
    start_iter = run.iter_num
    window_start, window_steps, window_tokens, excluded = None, 0, 0, 0.0
    skipped: list[tuple[int, torch.Tensor]] = []  # (iter, found_inf) since the last log
    nonfinite_streak = 0
    params = [p for p in model.parameters() if p.requires_grad]
    if loop.use_cuda_graphs:
        # Gradients allocated once and zeroed in place: a graph replay reuses its output memory, so a
        # .grad that autograd took over from one micro-step's replay would be overwritten by the next
        # (pytorch/pytorch#169545). With .grad preallocated, backward accumulates into it instead.
        for p in params:
            p.grad = torch.zeros_like(p)
    with interrupt_flag() as stop:
        while True:
            t0 = time.perf_counter()
            loop.maintenance(run, run.iter_num >= loop.max_iters)
            excluded += time.perf_counter() - t0
            if run.iter_num >= loop.max_iters:
                break

            lr = loop.lr_at(run.iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            step_tokens = 0
            for micro in range(loop.accum):
                x, y = loop.loader.next_batch()
                step_tokens += x.numel() * d.world_size
                with parallel.no_sync(loop.train_model, sync=micro == loop.accum - 1):
                    if loop.use_cuda_graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    with loop.autocast:
                        _, loss = loop.train_model(x, y)
                    loss = loss / loop.accum  # the mean over this rank's micro-batches
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if loop.gradient_log_interval and run.iter_num % loop.gradient_log_interval == 0:
                norms = parallel.grad_norms_by_module(model, scale=scaler.get_scale() if scaler else 1.0)
                loop.log.gradient_norms({"iter": run.iter_num, "norms": norms})
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = parallel.clip_grad_norm(params, loop.grad_clip)
            if scaler:
                # fp16: gradient overflow is routine and the scaler skips those steps itself;
                # only a non-finite loss counts as a fault
                found_inf = parallel.all_reduce_max((~torch.isfinite(loss_sum)).float(), d)
                scaler.step(optimizer)
                scaler.update()
            else:
                # a non-finite loss or gradient skips the step on device (no host sync), on every rank
                bad = ~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)
                found_inf = parallel.all_reduce_max(bad.float(), d)
                parallel.optimizer_step(optimizer, found_inf)
            if loop.fsdp_fp8_scales:
                fp8.precompute_fsdp_scales(model)
            optimizer.zero_grad(set_to_none=not loop.use_cuda_graphs)
            skipped.append((run.iter_num, found_inf))
            run.iter_num += 1
            run.tokens_seen += step_tokens
            if loop.after_step is not None:
                t0 = time.perf_counter()
                loop.after_step(run)
                excluded += time.perf_counter() - t0

            if run.iter_num - start_iter == loop.timing_warmup:  # the speed window starts after compilation
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                window_start, window_steps, window_tokens, excluded = time.perf_counter(), 0, 0, 0.0
            elif window_start is not None:
                window_steps += 1
                window_tokens += step_tokens

            it = run.iter_num - 1  # the step just taken
            if it % loop.log_interval != 0 and run.iter_num != loop.max_iters and not stop["requested"]:
                continue
            step_loss = parallel.all_reduce_mean(loss_sum, d).item()  # global-batch mean; syncs the host
            for (skipped_it, _), was_bad in zip(skipped, torch.stack([f for _, f in skipped]).tolist()):
                nonfinite_streak = nonfinite_streak + 1 if was_bad else 0
                if was_bad:
                    loop.log.event({"iter": skipped_it, "event": "skipped_nonfinite_step"})
                    print0(d, f"iter {skipped_it}: non-finite loss or gradient norm; optimizer step skipped")
            skipped.clear()
            record = {"iter": it, "loss": step_loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_seen": run.tokens_seen, "dt_ms": None, "tokens_per_sec": None, "mfu": None,
                      "memory_allocated_gb": None, "memory_peak_gb": None,
                      "memory_host_peak_gb": runlog.host_peak_gb()}
            if window_start is not None and window_steps > 0:
                elapsed = time.perf_counter() - window_start - excluded
                record["dt_ms"] = 1000 * elapsed / window_steps
                record["tokens_per_sec"] = window_tokens / elapsed
                record["mfu"] = hardware.mfu(loop.flops_per_token, record["tokens_per_sec"], d.world_size,
                                             loop.peak_flops)
                window_start, window_steps, window_tokens, excluded = time.perf_counter(), 0, 0, 0.0
            if d.device.type == "cuda":
                record["memory_allocated_gb"] = torch.cuda.memory_allocated(d.device) / 1024**3
                record["memory_peak_gb"] = torch.cuda.max_memory_allocated(d.device) / 1024**3
            loop.log.iteration(record)
            loop.log.flush()
            print0(d, format_record(record))
            if nonfinite_streak >= loop.max_nonfinite_steps:
                loop.log.close()
                raise TrainingError(f"{nonfinite_streak} consecutive non-finite steps up to iter {it}; the last "
                                    "checkpoint is intact: lower learning_rate or check the data, then resume")
            if parallel.all_reduce_max(torch.tensor(float(stop["requested"]), device=d.device), d).item():
                loop.save(run)
                loop.log.close()
                print0(d, f"interrupted at iter {run.iter_num}; {loop.resume_hint}")
                return 130
    loop.log.close()
    return 0


def setup_device(tc: TrainConfig) -> tuple[parallel.Dist, torch.dtype, str]:
    """Join the process group and check the launch: (dist, compute dtype, parallel mode)."""
    d = parallel.setup(tc.device)
    if tc.use_cuda_graphs and d.device.type != "cuda":
        raise TrainingError("use_cuda_graphs=True needs a CUDA GPU; CUDA graphs do not exist on CPU")
    if tc.fp8:
        fp8.check_supported(tc.fp8, d.device, tc.fp8_emulate)
    if tc.gradient_accumulation_steps % d.world_size:
        raise TrainingError(f"gradient_accumulation_steps={tc.gradient_accumulation_steps} must be divisible by "
                            f"the number of processes ({d.world_size})")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return d, resolve_dtype(tc.dtype, d.device), parallel_mode(d, zero1=tc.use_zero1, fsdp=tc.use_fsdp)


def parallel_mode(d: parallel.Dist, *, zero1: bool, fsdp: bool) -> str:
    """'fsdp', 'zero1', 'ddp' or 'single' (ZeRO-1 over one process is plain AdamW): checkpoint layouts differ."""
    if fsdp:
        return "fsdp"
    if d.world_size > 1:
        return "zero1" if zero1 else "ddp"
    return "single"


def train(tc: TrainConfig, mc: ModelConfig, explicit: set[str],
          transform: Callable[[GPT], object] | None = None) -> int:
    """Pretrain (or continue) a model; transform(model) runs on the raw model before wrapping (after fp8)."""
    import runlog
    import token_loader

    d, dtype, mode = setup_device(tc)
    accum = tc.gradient_accumulation_steps // d.world_size  # micro-steps per rank per optimizer step

    # -- what to train: data, architecture, weights --------------------------------------------
    ckpt_path, ckpt_state = None, None
    if tc.init_from == "resume":
        ckpt_path, ckpt_state = checkpoint.latest(tc.out_dir)
    elif tc.init_from != "scratch" and not os.path.isdir(tc.init_from):
        raise TrainingError(f"init_from={tc.init_from!r} is not 'scratch', 'resume' or an existing Hugging Face folder")
    configurator.check_output_dir(tc.out_dir)
    if d.is_master:
        checkpoint.remove_temps(tc.out_dir)
    ddir = token_loader.resolve_data_dir(tc.dataset)
    meta = token_loader.read_meta(ddir)
    mc = resolve_model_config(tc, mc, explicit, meta, ckpt_state)
    if meta["vocab_size"] > mc.vocab_size:
        raise TrainingError(f"dataset {tc.dataset} has vocab_size {meta['vocab_size']} but the model has "
                            f"{mc.vocab_size}; set --vocab_size={meta['vocab_size']} or larger")
    if mc.position_embedding == "learned" and tc.block_size > mc.block_size:
        raise TrainingError(f"block_size={tc.block_size} exceeds the model's {mc.block_size} learned positions")
    token_loader.check_sizes(token_loader.split_windows(ddir, tc.block_size, mc.vocab_size), tc.block_size,
                             tc.batch_size, accum, d.world_size, tc.eval_iters, token_loader.available_host_bytes())

    # -- the model: built, transformed, wrapped --------------------------------------------------
    torch.manual_seed(tc.seed)
    model = build_model(tc, mc, d.device, ckpt_path)
    fp8_summary = None
    if tc.fp8:  # a transform of the raw model, before compile and sharding
        fp8_summary = fp8.summary(fp8.convert(model, tc.fp8, tc.fp8_emulate, fsdp=tc.use_fsdp))
    if transform is not None:
        transform(model)
    if d.device.type == "cuda":  # warn before compilation and the first step, not after an OOM there
        misfit = hardware.memory_fit(model, tc.batch_size, tc.block_size, str(dtype).removeprefix("torch."),
                                     d.world_size, tc.use_zero1, tc.use_fsdp, tc.compile,
                                     torch.cuda.mem_get_info(d.device)[0],
                                     tc.gradient_accumulation_steps // d.world_size, tc.use_cuda_graphs)
        if misfit:
            print(f"warning: {misfit}", file=sys.stderr, flush=True)
    train_model = parallel.wrap(model, d, fsdp=tc.use_fsdp, compile=tc.compile, cuda_graphs=tc.use_cuda_graphs,
                                dtype=dtype, compile_mode=tc.compile_mode)
    optimizer = parallel.build_optimizer(model, d, zero1=tc.use_zero1, lr=tc.learning_rate,
                                         betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type) if dtype == torch.float16 else None
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    # -- data and state: the loader, a resume, the eval batches -----------------------------------
    loader = token_loader.TokenLoader(ddir, "train", tc.block_size, tc.batch_size, accum, d.rank, d.world_size,
                                      tc.seed, mc.vocab_size, d.device, tc.use_dataloader,
                                      tc.dataloader_num_workers, pin_memory=d.device.type == "cuda")
    run = RunState()
    if ckpt_state is not None:
        checkpoint.load_into(ckpt_path, d, model, optimizer, mode, ckpt_state, scaler)
        loader.load_state_dict(ckpt_state["loader"])
        run = RunState(ckpt_state["iter_num"], ckpt_state["tokens_seen"], ckpt_state["best_val_loss"])
    else:
        torch.manual_seed(tc.seed + d.rank)  # dropout differs by rank; a resume restores the saved RNG instead
    eval_sets = {split: token_loader.eval_batches(ddir, split, tc.block_size, tc.batch_size, tc.eval_iters * accum,
                                                  d.rank, d.world_size, mc.vocab_size)
                 for split in ("train", "val")}

    # -- the run log --------------------------------------------------------------------------------
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * tc.block_size
    fpt = model.flops_per_token(tc.block_size)
    peak, peak_note = hardware.peak_flops(hardware.device_name(d.device), str(dtype).removeprefix("torch."))
    if tc.fp8 and peak is not None:
        peak_note += f"; fp8 {tc.fp8} run: MFU is bf16-equivalent (FLOPs against the bf16 peak)"
    header = {
        "config": {"train": asdict(tc), "model": asdict(mc)},
        "environment": runlog.environment(d.world_size, d.device) | {"dtype": str(dtype), "peak_flops": peak,
                                                                        "mfu_note": peak_note},
        "model": {"architecture": mc.arch_string, "n_params": model.num_params(),
                  "n_params_non_embedding": model.num_params(non_embedding=True), "flops_per_token": fpt},
    }
    log = runlog.RunLog(tc.out_dir, d.is_master, header,
                        {"project": tc.wandb_project, "name": tc.wandb_run_name} if tc.wandb_log else None,
                        tc.tensorboard_log)
    print0(d, f"model {mc.arch_string}: {model.num_params():,} parameters, {fpt:.3g} FLOPs/token; {mode} on "
              f"{d.world_size} x {d.device.type}, {str(dtype).removeprefix('torch.')}, compile={tc.compile}")
    print0(d, f"tokens per step: {tc.batch_size} batch x {tc.gradient_accumulation_steps} accumulation "
              f"({accum} per rank) x {tc.block_size} tokens = {tokens_per_step:,}; MFU: {peak_note}")
    if fp8_summary is not None:
        print0(d, f"fp8 {tc.fp8}{' (emulated)' if tc.fp8_emulate else ''}: {fp8_summary}")
    if ckpt_state is not None:
        print0(d, f"resumed from {ckpt_path} at iter {run.iter_num}")
        log.event({"iter": run.iter_num, "event": "resumed", "from": ckpt_path})

    # -- the seams: checkpoint contents, evaluation and saving policy ------------------------------
    def save_checkpoint(run: RunState) -> None:
        if not tc.save_checkpoint:
            return
        state = {**asdict(run), "model_config": asdict(mc), "train_config": asdict(tc),
                 "loader": loader.state_dict(), "dataset": {"name": tc.dataset, "path": ddir, "meta": meta}}
        path = checkpoint.save(tc.out_dir, d, model, optimizer, mode, state, scaler)
        log.event({"iter": run.iter_num, "event": "checkpoint", "path": path})
        print0(d, f"saved checkpoint to {path} at iter {run.iter_num}")

    if tc.eval_only:
        losses = evaluate(model, eval_sets, autocast, d)
        log.evaluation({"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
        print0(d, f"eval at iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        log.close()
        return 0

    start_iter = run.iter_num

    def maintenance(run: RunState, done: bool) -> None:
        if run.iter_num % tc.eval_interval != 0 and not done:
            return
        losses = evaluate(model, eval_sets, autocast, d)
        log.evaluation({"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                        "tokens_seen": run.tokens_seen})
        print0(d, f"eval iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        improved = losses["val"] < run.best_val_loss
        if improved:
            run.best_val_loss = losses["val"]
        if run.iter_num > start_iter and (improved or tc.always_save_checkpoint or done):
            save_checkpoint(run)

    loop = Loop(d=d, model=model, train_model=train_model, optimizer=optimizer, loader=loader, log=log, accum=accum,
                max_iters=tc.max_iters,
                lr_at=lambda it: get_lr(it, tc.learning_rate, tc.warmup_iters, tc.lr_decay_iters, tc.min_lr,
                                        tc.decay_lr),
                maintenance=maintenance, save=save_checkpoint, grad_clip=tc.grad_clip, scaler=scaler,
                autocast=autocast, use_cuda_graphs=tc.use_cuda_graphs,
                fsdp_fp8_scales=bool(tc.use_fsdp and tc.fp8 and fp8.uses_fsdp_float8_all_gather(model)),
                timing_warmup=3 if tc.compile else 1, log_interval=tc.log_interval,
                gradient_log_interval=tc.gradient_log_interval, max_nonfinite_steps=tc.max_nonfinite_steps,
                flops_per_token=fpt, peak_flops=peak,
                resume_hint=f"resume with --init_from=resume --out_dir={tc.out_dir}")
    return run_loop(loop, run)


def format_record(r: dict) -> str:
    """One console line for a training_iterations record."""
    text = f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.3e}, grad norm {r['grad_norm']:.3f}"
    if r["dt_ms"] is not None:
        text += f", {r['dt_ms']:.1f} ms/iter, {r['tokens_per_sec']:,.0f} tok/s"
    if r["mfu"] is not None:
        text += f", MFU {100 * r['mfu']:.1f}%"
    return text


@contextlib.contextmanager
def interrupt_flag():
    """Yield {'requested': bool}, set by Ctrl-C or SIGTERM; a second signal kills at once (saves stay atomic)."""
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True
        signal.signal(signum, signal.SIG_DFL)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors caused by the user's input: printed as one line, no traceback. Anything else is a bug."""
    import hf_checkpoint
    import runlog
    import token_loader
    import tokenizer

    return (configurator.ConfigError, TrainingError, checkpoint.CheckpointError, parallel.LaunchError, fp8.FP8Error,
            token_loader.DataError, tokenizer.TokenizerError, hf_checkpoint.HFCheckpointError, runlog.RunLogError)


def run_command(body: Callable[[], int], extra_errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a command: a user error (user_errors() or extra_errors) is one `error:` line on stderr and exit 2,
    never a traceback; the process group is torn down either way."""
    try:
        return body()
    except (*user_errors(), *extra_errors) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    finally:
        parallel.teardown()


def main(argv: list[str]) -> int:
    def body() -> int:
        tc, mc, explicit = parse_config(argv)
        if tc.dry_run:
            dry_run(tc, mc)
            return 0
        return train(tc, mc, explicit)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
