"""
How a model is trained: the one loop that pretraining (train.py) and LoRA fine-tuning (finetune/train.py)
share, and the start-up both entry points run before it.

    d = loop.start(device)                                  # process group, device, TF32
    autocast, scaler = loop.precision(dtype, d.device)
    log, peak, note = loop.open_run_log(out_dir, d, dtype, {"config": ..., "model": ...})
    return loop.run_loop(loop.Loop(d, model, train_model, optimizer, loader, log, ...), RunState())

An optimizer step is three named phases, so that benches time the real step and not a copy:
forward_backward (the micro-steps: forward under autocast, backward, gradient sync on the last one)
-> optimizer_step (gradient norms, unscale, clip, skip a non-finite step on device, AdamW, zero the
gradients) -> the after_step hooks (what a transform or a trainer needs after each step: FP8's scale
refresh under FSDP, LoRA's spectral refactor). The loop never names either. LogWindow is the log
interval: the only host sync of the loop, the skipped-step report and the speed window.

What differs between pretraining and fine-tuning are the Loop's seams: the loader (next_batch()),
lr_at(it), evaluate_and_save(run, done), save(run) on an interrupt, and the hooks.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

import hardware
import optim
import parallel
import runlog
from errors import UserError


@dataclass
class RunState:
    """What a checkpoint must carry to continue exactly: progress and the best val loss."""

    iter_num: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    best_val_loss: float = float("inf")


class TrainingError(UserError):
    """A run that cannot start or go on; the message is one line naming the fix."""


def get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float,
           decay_lr: bool = True, schedule: str = "cosine", decay_fraction: float = 0.2,
           decay_shape: str = "linear") -> float:
    """Linear warmup from learning_rate / (warmup_iters + 1) to learning_rate, then to min_lr at lr_decay_iters:
    cosine all the way ("cosine"), or warmup-stable-decay ("wsd": the peak until the last decay_fraction of
    lr_decay_iters, then down, linearly or as 1 - sqrt of the decay's progress)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if not decay_lr:
        return learning_rate
    if it >= lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        start = max(warmup_iters, lr_decay_iters - round(decay_fraction * lr_decay_iters))
        if it < start:
            return learning_rate
        progress = (it - start) / max(1, lr_decay_iters - start)
        return min_lr + (1.0 - (math.sqrt(progress) if decay_shape == "1-sqrt" else progress)) * (learning_rate - min_lr)
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# -- start-up ------------------------------------------------------------------------------------------


def start(device: str) -> parallel.Dist:
    """Join the process group (torchrun's variables; world size 1 otherwise), turn on TF32 on GPUs, take
    Ctrl-C and SIGTERM (INTERRUPT) and, under torchrun, stop this worker if its launcher dies. Pair with
    finish()."""
    INTERRUPT.install()
    d = parallel.setup(device)
    INTERRUPT.quiet = not d.is_master
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _watch_launcher(d.rank)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return d


def finish() -> None:
    """Undo start(): the signal handlers it took, the out_dir lock the run held, the process group."""
    import checkpoint

    INTERRUPT.uninstall()
    checkpoint.release_locks()
    parallel.teardown()


def _watch_launcher(rank: int) -> None:
    """A daemon thread that ends this worker when torchrun, its parent, is gone.

    torchrun starts its workers in sessions of their own, so killing the launcher's process group (a
    scheduler's kill, Ctrl-C on a wrapper script) does not reach them: without this they would train on,
    holding the out_dir lock. The worker exits within a second; a checkpoint being written is left as a
    temp folder (never swapped in), so the last complete checkpoint stays the one a resume reads.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"rank {rank}: the launcher (pid {parent}) is gone; stopping. The last checkpoint is intact: "
              f"resume with --init_from=resume", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def precision(dtype: torch.dtype, device: torch.device) -> tuple[contextlib.AbstractContextManager,
                                                                  torch.amp.GradScaler | None]:
    """(autocast, scaler) for a compute dtype: no autocast in float32, a GradScaler only for float16."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return autocast, scaler


def open_run_log(out_dir: str, d: parallel.Dist, dtype: torch.dtype, sections: dict, *, mfu_note: str = "",
                 **sinks) -> tuple[runlog.RunLog, float | None, str]:
    """The run log with the header both entry points write: sections (config, model, ...) and the
    environment with the dtype and the device's peak FLOP/s. sinks go to runlog.RunLog (wandb, ...).

    Returns (log, peak FLOP/s or None where unknown, the MFU note; mfu_note is appended to it)."""
    dtype_name = str(dtype).removeprefix("torch.")
    peak, note = hardware.peak_flops(hardware.device_name(d.device), dtype_name)
    if mfu_note and peak is not None:
        note += f"; {mfu_note}"
    env = runlog.environment(d.world_size, d.device) | {"dtype": str(dtype), "peak_flops": peak, "mfu_note": note}
    header = {"config": sections["config"], "environment": env, **{k: v for k, v in sections.items() if k != "config"}}
    return runlog.RunLog(out_dir, d.is_master, header, **sinks), peak, note


def announce_resume(d: parallel.Dist, log: runlog.RunLog, path: str, it: int) -> None:
    print0(d, f"resumed from {path} at iter {it}")
    log.event({"iter": it, "event": "resumed", "from": path})


def print0(d: parallel.Dist, *args: object) -> None:
    if d.is_master:
        print(*args, flush=True)


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True) -> Iterable:
    """A tqdm bar on stderr over a long phase (tokenizing, evaluating, decoding), gone when it ends; nothing
    when not enabled (ranks other than 0)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


# -- the loop ------------------------------------------------------------------------------------------


Hook = Callable[[RunState], None]


@dataclass
class Loop:
    """What the shared training loop runs: the pieces a caller built, and its seams as callbacks.

    train.py fills it for pretraining; finetune/train.py for LoRA (a LoRA model, an SFT loader, an
    answer-accuracy evaluator, an adapter-only checkpoint, the spectral refactor as a hook).
    """

    d: parallel.Dist
    model: torch.nn.Module  # the raw module (saving, eval, hooks)
    train_model: torch.nn.Module  # the compiled/wrapped module the steps run
    optimizer: torch.optim.Optimizer  # over the trainable parameters only
    loader: object  # next_batch() -> (x, y) on device; TokenLoader's interface
    log: runlog.RunLog
    accum: int  # micro-steps per rank per optimizer step
    max_iters: int
    lr_at: Callable[[int], float]  # learning rate of optimizer step `it`
    # before every step and once at the end (done=True): evaluate and checkpoint as the caller decides;
    # its wall time is excluded from the speed figures
    evaluate_and_save: Callable[[RunState, bool], None]
    save: Callable[[RunState], None]  # checkpoint now (on Ctrl-C/SIGTERM)
    after_step: list[Hook] = field(default_factory=list)  # after each optimizer step, in order
    grad_clip: float = 1.0
    scaler: torch.amp.GradScaler | None = None
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    use_cuda_graphs: bool = False
    timing_warmup: int = 1  # steps excluded from speed figures (compilation, graph capture)
    log_interval: int = 10
    gradient_log_interval: int = 0
    max_nonfinite_steps: int = 5
    flops_per_token: int = 0
    peak_flops: float | None = None
    resume_hint: str = ""  # how to continue after an interrupt, printed with it; {iter} becomes the step

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.use_cuda_graphs:
            # Gradients allocated once and zeroed in place: a graph replay reuses its output memory, so a
            # .grad that autograd took over from one micro-step's replay would be overwritten by the next
            # (pytorch/pytorch#169545). With .grad preallocated, backward accumulates into it instead.
            for p in self.params:
                p.grad = torch.zeros_like(p)


@dataclass
class Step:
    """One optimizer step's results, on device until a log interval reads them."""

    lr: float
    loss: torch.Tensor  # this rank's share of the step's mean loss (forward_backward); all_reduce_mean: the mean
    grad_norm: torch.Tensor  # global, before clipping
    found_inf: torch.Tensor  # 1 where the step was skipped (non-finite loss or gradient), equal on every rank
    tokens: int  # tokens of the global batch


def set_lr(loop: Loop, lr: float) -> None:
    optim.set_lr(loop.optimizer, lr)


def forward_backward(loop: Loop) -> tuple[torch.Tensor, int]:
    """The micro-steps of one optimizer step: (this rank's share of the step's mean loss, tokens of the global batch).

    The loss is the mean over every target of the step (y != -1, on every micro-batch of every rank), so the
    gradient is the same however the step is split into micro-batches and ranks: each micro-batch's mean is
    weighted by its share of the step's targets, as HF Trainer's num_items_in_batch does (transformers >= 4.46).
    Pretraining's batches have equal target counts, so each weighs 1 / accum. Tokens are counted from the
    batches (x.numel() per micro-batch, times the world size), so padded SFT batches count too.
    """
    batches = [loop.loader.next_batch() for _ in range(loop.accum)]  # all first: their targets set the weights
    targets = torch.stack([(y != -1).sum() for _, y in batches]).float()  # (accum,) on device, no host sync
    total = parallel.all_reduce_sum(targets.sum(), loop.d)  # the step's targets, over every rank
    # gradients are averaged over ranks, so each rank's weights sum to world_size x its share
    weights = targets * loop.d.world_size / total
    loss_sum = torch.zeros((), device=loop.d.device)
    tokens = 0
    for micro, (x, y) in enumerate(batches):
        tokens += x.numel() * loop.d.world_size
        with parallel.no_sync(loop.train_model, sync=micro == loop.accum - 1):
            if loop.use_cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with loop.autocast:
                _, loss = loop.train_model(x, y)
            loss = loss * weights[micro]  # (targets of this micro-batch) / (targets of the step), x world_size
            (loop.scaler.scale(loss) if loop.scaler else loss).backward()
        loss_sum += loss.detach()
    return loss_sum, tokens


def optimizer_step(loop: Loop, loss: torch.Tensor, it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and step on the accumulated gradients, then zero them: (grad norm, found_inf). No host sync.

    A non-finite loss or gradient norm skips the step on device, on every rank alike. Under fp16 the
    GradScaler skips gradient overflows itself (they are routine); only a non-finite loss is a fault.
    """
    scaler = loop.scaler
    if loop.gradient_log_interval and it % loop.gradient_log_interval == 0:
        norms = parallel.grad_norms_by_module(loop.model, scale=scaler.get_scale() if scaler else 1.0)
        loop.log.gradient_norms({"iter": it, "norms": norms})
    if scaler:
        scaler.unscale_(loop.optimizer)
    grad_norm = parallel.clip_grad_norm(loop.params, loop.grad_clip)
    if scaler:
        found_inf = parallel.all_reduce_max((~torch.isfinite(loss)).float(), loop.d)
        scaler.step(loop.optimizer)
        scaler.update()
    else:
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        found_inf = parallel.all_reduce_max(bad.float(), loop.d)
        optim.step(loop.optimizer, found_inf)
    loop.optimizer.zero_grad(set_to_none=not loop.use_cuda_graphs)
    return grad_norm, found_inf


def train_step(loop: Loop, run: RunState, mark: Callable[[], None] | None = None) -> Step:
    """One optimizer step at run.iter_num, then the after_step hooks; advances run.

    mark, if given, runs between the backward passes and the optimizer step (benches record a CUDA event).
    """
    lr = loop.lr_at(run.iter_num)
    set_lr(loop, lr)
    loss, tokens = forward_backward(loop)
    if mark is not None:
        mark()
    grad_norm, found_inf = optimizer_step(loop, loss, run.iter_num)
    run.iter_num += 1
    run.tokens_seen += tokens
    for hook in loop.after_step:
        hook(run)
    return Step(lr, loss, grad_norm, found_inf, tokens)


class LogWindow:
    """The log interval: the loss and skip flags of the steps since the last record (read with one host
    sync), and the speed window (steps and tokens since the last record, time spent outside steps excluded)."""

    def __init__(self, loop: Loop, start_iter: int) -> None:
        self.loop, self.start_iter = loop, start_iter
        self.started: float | None = None  # perf_counter at the window's start; None until timing_warmup steps ran
        self.steps, self.tokens, self.excluded = 0, 0, 0.0
        self.pending: list[tuple[int, torch.Tensor]] = []  # (iter, found_inf) not yet read
        self.nonfinite_streak = 0

    @contextlib.contextmanager
    def outside_steps(self):
        """Time spent in here (evaluation, checkpoints) is not part of the speed figures."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def add(self, run: RunState, step: Step) -> None:
        self.pending.append((run.iter_num - 1, step.found_inf))
        if run.iter_num - self.start_iter == self.loop.timing_warmup:  # the window starts after compilation
            if self.loop.d.device.type == "cuda":
                torch.cuda.synchronize()
            self._restart()
        elif self.started is not None:
            self.steps += 1
            self.tokens += step.tokens

    def _restart(self) -> None:
        self.started, self.steps, self.tokens, self.excluded = time.perf_counter(), 0, 0, 0.0

    def record(self, run: RunState, step: Step) -> dict:
        """The training_iterations record of the step just taken; reports skipped steps. Syncs the host."""
        loop, d = self.loop, self.loop.d
        loss = parallel.all_reduce_mean(step.loss, d).item()  # the global-batch mean
        flags = torch.stack([f for _, f in self.pending]).tolist()
        for (skipped_it, _), was_bad in zip(self.pending, flags):
            self.nonfinite_streak = self.nonfinite_streak + 1 if was_bad else 0
            if was_bad:
                loop.log.event({"iter": skipped_it, "event": "skipped_nonfinite_step"})
                print0(d, f"iter {skipped_it}: non-finite loss or gradient norm; optimizer step skipped")
        self.pending.clear()
        record = {"iter": run.iter_num - 1, "loss": loss, "lr": step.lr, "grad_norm": step.grad_norm.item(),
                  "tokens_seen": run.tokens_seen, "dt_ms": None, "tokens_per_sec": None, "mfu": None,
                  "memory_allocated_gb": None, "memory_peak_gb": None,
                  "memory_host_peak_gb": runlog.host_peak_gb()}
        if self.started is not None and self.steps > 0:
            elapsed = time.perf_counter() - self.started - self.excluded
            record["dt_ms"] = 1000 * elapsed / self.steps
            record["tokens_per_sec"] = self.tokens / elapsed
            record["mfu"] = hardware.mfu(loop.flops_per_token, record["tokens_per_sec"], d.world_size, loop.peak_flops)
            self._restart()
        if d.device.type == "cuda":
            record["memory_allocated_gb"] = torch.cuda.memory_allocated(d.device) / 1024**3
            record["memory_peak_gb"] = torch.cuda.max_memory_allocated(d.device) / 1024**3
        return record


def run_loop(loop: Loop, run: RunState) -> int:
    """Step, log and call the seams until run.iter_num == max_iters.

    Returns 0 when done, 130 when interrupted (after a checkpoint of the steps taken). One process honours
    a stop after the current step; under torchrun the ranks agree on it at the next log interval, the only
    point where every rank is sure to run the same collective.
    """
    window = LogWindow(loop, run.iter_num)
    while True:
        done = run.iter_num >= loop.max_iters
        try:
            with window.outside_steps():
                loop.evaluate_and_save(run, done)
        except Interrupted:
            return _interrupted(loop, run)
        if done:
            break
        step = train_step(loop, run)
        INTERRUPT.stepping = True  # from now on there is something to save
        window.add(run, step)
        it = run.iter_num - 1  # the step just taken
        stop_now = INTERRUPT.requested and loop.d.world_size == 1
        if it % loop.log_interval != 0 and run.iter_num != loop.max_iters and not stop_now:
            continue
        record = window.record(run, step)
        loop.log.iteration(record)
        loop.log.flush()
        print0(loop.d, format_record(record, loop.max_iters))
        if window.nonfinite_streak >= loop.max_nonfinite_steps:
            loop.log.close()
            raise TrainingError(f"{window.nonfinite_streak} consecutive non-finite steps up to iter {it}; the "
                                "last checkpoint is intact: lower learning_rate or check the data, then resume")
        if stop_requested(loop.d):
            return _interrupted(loop, run)
    loop.log.close()
    return 0


def _interrupted(loop: Loop, run: RunState) -> int:
    loop.save(run)
    loop.log.close()
    print0(loop.d, f"interrupted at iter {run.iter_num}; " + loop.resume_hint.replace("{iter}", str(run.iter_num)))
    return 130


def format_record(r: dict, max_iters: int | None = None) -> str:
    """One console line for a training_iterations record; with max_iters, the time the remaining steps take
    at this speed (evaluations and checkpoints not counted)."""
    text = f"iter {r['iter']}: loss {r['loss']:.4f}, lr {r['lr']:.3e}, grad norm {r['grad_norm']:.3f}"
    if r["dt_ms"] is not None:
        text += f", {r['dt_ms']:.1f} ms/iter, {r['tokens_per_sec']:,.0f} tok/s"
    if r["mfu"] is not None:
        text += f", MFU {100 * r['mfu']:.1f}%"
    if r["dt_ms"] is not None and max_iters is not None and max_iters > r["iter"] + 1:
        seconds = round(r["dt_ms"] * (max_iters - r["iter"] - 1) / 1000)
        text += f", steps left {max_iters - r['iter'] - 1} (~{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s)"
    return text


# -- interrupts ----------------------------------------------------------------------------------------


class Interrupted(Exception):
    """A stop requested during an evaluation: the loop saves the training state it has and exits."""


class Interrupt:
    """Ctrl-C and SIGTERM, from start() to finish().

    Before a run's first optimizer step there is nothing new to save, so a signal exits at once (status
    130): set-up, data checks and compilation are not waited for. From the first step on, a signal asks
    for a stop: run_loop finishes the step, saves and exits 130, and an evaluation stops between batches
    (check_interrupt). A second signal kills at once; a checkpoint being written stays atomic.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stepping = False  # the run's first optimizer step has completed
        self.quiet = False  # a rank other than 0 prints nothing
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        self.requested = self.stepping = self.quiet = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second signal: the default action, exit at once
        if not self.stepping:
            if not self.quiet:
                print(f"{signal.Signals(signum).name}: stopped before the first step; nothing new to save",
                      file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True


INTERRUPT = Interrupt()


def stop_requested(d: parallel.Dist) -> bool:
    """Whether a stop was asked for on any rank: a collective when world_size > 1 (every rank must call it
    at the same point)."""
    if d.world_size == 1:
        return INTERRUPT.requested
    flag = torch.tensor(float(INTERRUPT.requested), device=d.device)
    return bool(parallel.all_reduce_max(flag, d).item())


def check_interrupt(d: parallel.Dist) -> None:
    """Between evaluation batches: raise Interrupted if a stop was asked for (stop_requested's rule)."""
    if stop_requested(d):
        raise Interrupted
