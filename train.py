"""
Train a GPT-2, LLaMA-2, LLaMA-3 or Qwen3 model, from one CPU to many GPUs.

    python train.py config/train_shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py config/full_qwen3_1.8b_optimal.py --use_zero1=True

Every default lives in train_config.TrainConfig or in model.ModelConfig; a config file (Python
assignments) and --key=value overrides are checked against both.

The story of a run, one function per phase: launch (join the process group, check the launch) ->
what_to_train (checkpoint, data, architecture) -> build (the raw `model`: scratch, checkpoint or
Hugging Face weights; transforms such as FP8; wrapped into `train_model`: compile, DDP/ZeRO-1/FSDP;
the optimizer) -> data and state (the loader, a resume's optimizer, RNG and loader state, the eval
batches, the downstream tasks of eval_tasks) -> the run log -> loop.run_loop with pretraining's seams:
evaluate (val loss; task accuracy, evals.py) and checkpoint at intervals. How one step runs (micro-steps, clipping, skipping non-finite steps, logging) is loop.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

import build
import checkpoint
import configurator
import errors
import fp8
import hardware
import loop
import parallel
import runlog
from loop import RunState, TrainingError, print0
from model import GPT, ModelConfig
from train_config import TrainConfig

if TYPE_CHECKING:
    import evals


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: dict[str, list], autocast, d: parallel.Dist) -> dict[str, float]:
    """Mean loss over each split's fixed batches and over ranks; a stop request ends it between batches
    (every rank holds the same number of batches, so the check is collective-safe)."""
    model.eval()
    out = {}
    for split, split_batches in batches.items():
        losses = torch.zeros(len(split_batches), device=d.device)
        for i, (x, y) in enumerate(split_batches):
            loop.check_interrupt(d)
            with autocast:
                _, loss = model(x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True))
            losses[i] = loss
        out[split] = parallel.all_reduce_mean(losses.mean(), d).item()
    model.train()
    return out


def dry_run(tc: TrainConfig, mc: ModelConfig, explicit: set[str] = frozenset()) -> dict:
    """Shapes, FLOPs and a memory estimate from the meta device; reads no tokens. The vocabulary is the one
    training would use: the config's, else the prepared dataset's meta.json (padded to 64), as train() does.
    The world size is WORLD_SIZE (torchrun sets it), so `WORLD_SIZE=8 ... --dry_run=True` plans 8 GPUs."""
    import token_loader

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tc.gradient_accumulation_steps % world:
        raise TrainingError(
            f"gradient_accumulation_steps={tc.gradient_accumulation_steps} is not divisible by the world size {world}"
        )
    if tc.init_from not in ("scratch", "resume"):
        mc = build.resolve_model_config(tc, mc, set(), None, None)
    elif "vocab_size" not in explicit:
        try:
            meta = token_loader.read_meta(token_loader.resolve_data_dir(tc.dataset))
            mc = build.resolve_model_config(tc, mc, explicit, meta, None)
        except token_loader.DataError:
            print(f"note: dataset {tc.dataset} is not prepared, so vocab_size is the default {mc.vocab_size:,}; "
                  f"training takes it from the dataset")
    with torch.device("meta"):
        model = GPT(mc)
    dtype = "bfloat16" if tc.dtype == "auto" else tc.dtype
    mem = build.memory_estimate(model, tc, world, dtype)
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
          f"{tc.block_size} = {tokens:,}; whole run: {tc.max_iters:,} steps x {tokens:,} = {tc.max_iters * tokens:,} "
          f"tokens ({tc.max_iters * tokens / 1e9:.2f}B)")
    if "WORLD_SIZE" not in os.environ:
        print("(one process; for N GPUs prefix WORLD_SIZE=N, as torchrun sets it: the memory per GPU changes with "
              "ZeRO-1/FSDP sharding and the accumulation per rank)")
    print(f"estimated memory per GPU ({dtype}, batch {tc.batch_size} x {tc.block_size}, "
          f"{'compiled' if tc.compile else 'eager'}): weights {mem['weights_gb']:.2f} GiB, grads {mem['grads_gb']:.2f}, "
          f"optimizer{' (muon)' if tc.optimizer == 'muon' else ''} {mem['optimizer_gb']:.2f}, activations {mem['activations_gb']:.2f}, "
          f"loss buffers {mem['loss_buffers_gb']:.2f}; total {mem['total_gb']:.2f} GiB (+ CUDA context)")
    summary = {
        "architecture": mc.arch_string,
        "n_params": model.num_params(),
        "n_params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(tc.block_size),
        "tokens_per_step": tokens,
        "total_tokens": tc.max_iters * tokens,
        "world_size": world,
        "gradient_accumulation_per_rank": per_rank,
        "est_memory_gb_per_gpu": round(mem["total_gb"], 3),
        "est_memory_breakdown_gb": {k: round(v, 3) for k, v in mem.items() if k != "total_gb"},
    }
    if fp8_plan is not None:
        summary["fp8_linears"] = sorted(k for k, v in fp8_plan.items() if v == "fp8")
    print(json.dumps(summary))
    return summary


def launch(tc: TrainConfig) -> tuple[parallel.Dist, torch.dtype, parallel.Layout]:
    """Join the process group and check the launch: (dist, compute dtype, parallel layout)."""
    d = loop.start(tc.device)
    if tc.use_cuda_graphs and d.device.type != "cuda":
        raise TrainingError("use_cuda_graphs=True needs a CUDA GPU; CUDA graphs do not exist on CPU")
    if tc.fp8:
        fp8.check_supported(tc.fp8, d.device, tc.fp8_emulate)
    if tc.gradient_accumulation_steps % d.world_size:
        raise TrainingError(f"gradient_accumulation_steps={tc.gradient_accumulation_steps} must be divisible by "
                            f"the number of processes ({d.world_size})")
    return d, hardware.resolve_dtype(tc.dtype, d.device), parallel.layout(d, zero1=tc.use_zero1, fsdp=tc.use_fsdp)


@dataclass
class Source:
    """What a run trains: the checkpoint it resumes (if any), the data and the architecture."""

    ckpt_path: str | None
    ckpt_state: dict | None
    data_dir: str
    meta: dict
    model_config: ModelConfig
    lock: checkpoint.DirLock | None  # out_dir's lock, held while this object lives (rank 0; None elsewhere)


def what_to_train(tc: TrainConfig, mc: ModelConfig, explicit: set[str], d: parallel.Dist, accum: int) -> Source:
    """The checkpoint, dataset and architecture of the run, checked against each other before any work."""
    import token_loader

    ckpt_path, ckpt_state = None, None
    if tc.init_from == "resume":
        ckpt_path, ckpt_state = checkpoint.latest(tc.out_dir)
        saved = ckpt_state.get("train_config", {}).get("optimizer", "adamw")
        if saved != tc.optimizer:
            raise TrainingError(f"{ckpt_path} was trained with optimizer={saved} and this run asks for "
                                f"optimizer={tc.optimizer}; resume with --optimizer={saved} (its optimizer state "
                                f"does not carry over), or train the other one in another --out_dir")
    elif tc.init_from != "scratch" and not os.path.isdir(tc.init_from):
        raise TrainingError(f"init_from={tc.init_from!r} is not 'scratch', 'resume' or an existing Hugging Face folder")
    configurator.check_output_dir(tc.out_dir)
    new_run = tc.init_from != "resume" and tc.save_checkpoint and not tc.eval_only  # one that may replace a model
    lock = parallel.on_master(lambda: claim_out_dir(tc.out_dir, new_run, tc.overwrite_out_dir), d)
    ddir = token_loader.resolve_data_dir(tc.dataset)
    meta = token_loader.read_meta(ddir)
    mc = build.resolve_model_config(tc, mc, explicit, meta, ckpt_state)
    if meta["vocab_size"] > mc.vocab_size:
        raise TrainingError(f"dataset {tc.dataset} has vocab_size {meta['vocab_size']} but the model has "
                            f"{mc.vocab_size}; set --vocab_size={meta['vocab_size']} or larger")
    if (problem := token_loader.vocab_mismatch(meta, mc.vocab_size)) is not None and ckpt_state is None:
        raise TrainingError(f"dataset {tc.dataset}: {problem}; prepare the data with the preset's tokenizer, or "
                            f"set --vocab_size={meta['vocab_size']} to train this shape on it")
    if mc.position_embedding == "learned" and tc.block_size > mc.block_size:
        raise TrainingError(f"block_size={tc.block_size} exceeds the model's {mc.block_size} learned positions")
    token_loader.check_sizes(token_loader.split_windows(ddir, tc.block_size, mc.vocab_size), tc.block_size,
                             tc.batch_size, accum, d.world_size, tc.eval_iters, token_loader.available_host_bytes())
    return Source(ckpt_path, ckpt_state, ddir, meta, mc, lock)


@dataclass
class TaskEval:
    """The downstream tasks a run scores in the loop (evals.py), with the dataset's tokenizer."""

    tasks: list[evals.Task]
    encoder: evals.Encoder
    interval: int  # iterations between task evaluations


def task_eval(tc: TrainConfig, meta: dict, data_dir: str, block_size: int) -> TaskEval | None:
    """eval_tasks loaded and checked before any work (None when off): the tasks' files and the tokenizer."""
    if not tc.eval_tasks:
        return None
    import evals
    from tokenizer import tokenizer_from_meta

    tasks = evals.load_tasks(evals.parse_task_list(tc.eval_tasks), tc.eval_tasks_max_examples or None)
    enc = evals.encoder_from_tokenizer(tokenizer_from_meta(meta, data_dir))
    evals.tokenize(tasks, enc, block_size)  # once for the run; a continuation that cannot fit fails here
    return TaskEval(tasks, enc, tc.eval_tasks_interval or tc.eval_interval)


def evaluate_tasks(model: torch.nn.Module, te: TaskEval, autocast, d: parallel.Dist) -> dict:
    """Each task's acc, acc_norm and centered accuracy, the CORE aggregate and the seconds it took, as
    fields of the evaluation record; every rank scores its share (a stop request ends it between batches)."""
    import evals

    r = evals.evaluate(model, te.encoder, te.tasks, autocast=autocast, rank=d.rank, world_size=d.world_size,
                       device=d.device, step=lambda: loop.check_interrupt(d))
    print0(d, f"tasks: {evals.summary(r)}")
    keep = ("acc", "acc_norm", "centered", "random_baseline", "core_metric")
    return {"tasks": {name: {k: v[k] for k in keep} for name, v in r["tasks"].items()},
            "core": r["core"], "tasks_seconds": round(r["seconds"], 3)}


def claim_out_dir(out_dir: str, new_run: bool, overwrite_out_dir: bool) -> checkpoint.DirLock:
    """Take out_dir for this run (on rank 0; build.claim_out_dir). A new run (new_run: scratch or Hugging Face
    weights, saving checkpoints) never replaces a trained model unless overwrite_out_dir says so; then the
    old checkpoint goes only once every check has passed (overwrite())."""
    def refusal(found: list[str]) -> TrainingError:
        it = checkpoint.read_state(found[0]).get("iter_num", "?")
        return TrainingError(f"{out_dir} holds a trained model ({found[0]}, iter {it}); continue it with "
                             f"--init_from=resume, start over with --overwrite_out_dir=True (which deletes it), "
                             f"or choose another --out_dir")

    return build.claim_out_dir(out_dir, "out_dir", lambda: [p for p in [checkpoint.find(out_dir)] if p],
                               refusal if new_run and not overwrite_out_dir else None)


def overwrite(out_dir: str, new_run: bool, overwrite_out_dir: bool, d: parallel.Dist) -> None:
    """--overwrite_out_dir=True: delete the old run's checkpoint, now that the new run has passed every check
    and is about to train (a mistake in its flags must not cost the old model)."""
    previous = checkpoint.find(out_dir)
    replaces = new_run and overwrite_out_dir and previous is not None
    build.overwrite_out_dir(out_dir, [checkpoint.CKPT, checkpoint.OLD] if replaces else [], d,
                            f"overwrite_out_dir: deleted the previous checkpoint of {out_dir} ({previous})")


def open_log(tc: TrainConfig, mc: ModelConfig, d: parallel.Dist, layout: parallel.Layout, dtype: torch.dtype,
             model: GPT, accum: int, fp8_summary: str | None) -> tuple[runlog.RunLog, float | None, int]:
    """(run log, peak FLOP/s or None, FLOPs per token): the log's header written (build.model_summary, as
    fine-tuning's) and the run's shape printed."""
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * tc.block_size
    fpt = model.flops_per_token(tc.block_size)
    log, peak, peak_note = loop.open_run_log(
        tc.out_dir, d, dtype,
        {"config": {"train": asdict(tc), "model": asdict(mc)},
         "model": build.model_summary(model, fpt, n_params_non_embedding=model.num_params(non_embedding=True))},
        mfu_note=f"fp8 {tc.fp8} run: MFU is bf16-equivalent (FLOPs against the bf16 peak)" if tc.fp8 else "",
        wandb={"project": tc.wandb_project, "name": tc.wandb_run_name} if tc.wandb_log else None,
        tensorboard=tc.tensorboard_log)
    print0(d, f"model {mc.arch_string}: {model.num_params():,} parameters, {fpt:.3g} FLOPs/token; {layout.name} on "
              f"{d.world_size} x {d.device.type}, {str(dtype).removeprefix('torch.')}, compile={tc.compile}; "
              f"optimizer {tc.optimizer}, lr schedule {tc.lr_schedule}")
    print0(d, f"tokens per step: {tc.batch_size} batch x {tc.gradient_accumulation_steps} accumulation "
              f"({accum} per rank) x {tc.block_size} tokens = {tokens_per_step:,}; "
              + (f"MFU against the {peak_note}" if peak is not None else peak_note))
    if fp8_summary is not None:
        print0(d, f"fp8 {tc.fp8}{' (emulated)' if tc.fp8_emulate else ''}: {fp8_summary}")
    return log, peak, fpt


def train(tc: TrainConfig, mc: ModelConfig, explicit: set[str]) -> int:
    """Pretrain (or continue) a model."""
    import token_loader

    d, dtype, layout = launch(tc)
    accum = tc.gradient_accumulation_steps // d.world_size  # micro-steps per rank per optimizer step
    src = what_to_train(tc, mc, explicit, d, accum)
    mc = src.model_config
    tasks = task_eval(tc, src.meta, src.data_dir, mc.block_size)  # task files and tokenizer, checked before the build
    model, train_model, optimizer, hooks, fp8_summary = build.build(tc, mc, d, dtype, src.ckpt_path)
    autocast, scaler = loop.precision(dtype, d.device)

    # -- data and state: the loader, a resume, the eval batches -----------------------------------
    loader = token_loader.TokenLoader(src.data_dir, "train", tc.block_size, tc.batch_size, accum, d.rank,
                                      d.world_size, tc.seed, mc.vocab_size, d.device, tc.use_dataloader,
                                      tc.dataloader_num_workers, pin_memory=d.device.type == "cuda")
    run = build.resume(src.ckpt_path, src.ckpt_state, d, layout, model, optimizer, loader, tc.seed, scaler)
    eval_sets = {split: token_loader.eval_batches(src.data_dir, split, tc.block_size, tc.batch_size,
                                                  tc.eval_iters * accum, d.rank, d.world_size, mc.vocab_size)
                 for split in ("train", "val")}

    log, peak, fpt = open_log(tc, mc, d, layout, dtype, model, accum, fp8_summary)
    if src.ckpt_state is not None:
        loop.announce_resume(d, log, src.ckpt_path, run.iter_num)

    # -- the seams: checkpoint contents, evaluation and saving policy ------------------------------
    def save_checkpoint(run: RunState) -> None:
        if not tc.save_checkpoint:
            return
        state = {**asdict(run), "model_config": asdict(mc), "train_config": asdict(tc), "loader": loader.state_dict(),
                 "dataset": {"name": tc.dataset, "path": src.data_dir, "meta": src.meta}}
        path = checkpoint.save(tc.out_dir, d, model, optimizer, layout, state, scaler)
        log.event({"iter": run.iter_num, "event": "checkpoint", "path": path})
        print0(d, f"saved checkpoint to {path} at iter {run.iter_num}")

    if tc.eval_only:
        losses = evaluate(model, eval_sets, autocast, d)
        print0(d, f"eval at iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        scores = evaluate_tasks(model, tasks, autocast, d) if tasks is not None else {}
        log.evaluation({"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"], **scores})
        log.close()
        return 0

    start_iter = run.iter_num
    overwrite(tc.out_dir, tc.init_from != "resume" and tc.save_checkpoint, tc.overwrite_out_dir, d)

    def evaluate_and_save(run: RunState, done: bool) -> None:
        tasks_due = tasks is not None and (run.iter_num % tasks.interval == 0 or done)
        if run.iter_num % tc.eval_interval != 0 and not done:
            if tasks_due:  # a task interval between loss evaluations: a record of its own
                log.evaluation({"iter": run.iter_num, "tokens_seen": run.tokens_seen,
                                **evaluate_tasks(model, tasks, autocast, d)})
            return
        losses = evaluate(model, eval_sets, autocast, d)
        print0(d, f"eval iter {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        scores = evaluate_tasks(model, tasks, autocast, d) if tasks_due else {}
        log.evaluation({"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                        "tokens_seen": run.tokens_seen, **scores})
        improved = losses["val"] < run.best_val_loss
        if improved:
            run.best_val_loss = losses["val"]
        if run.iter_num > start_iter and (improved or tc.always_save_checkpoint or done):
            save_checkpoint(run)

    return loop.run_loop(loop.Loop(
        d=d, model=model, train_model=train_model, optimizer=optimizer, loader=loader, log=log, accum=accum,
        max_iters=tc.max_iters,
        lr_at=build.lr_at(tc),
        evaluate_and_save=evaluate_and_save, save=save_checkpoint, after_step=hooks, grad_clip=tc.grad_clip,
        scaler=scaler, autocast=autocast, use_cuda_graphs=tc.use_cuda_graphs,
        timing_warmup=3 if tc.compile else 1, log_interval=tc.log_interval,
        gradient_log_interval=tc.gradient_log_interval, max_nonfinite_steps=tc.max_nonfinite_steps,
        flops_per_token=fpt, peak_flops=peak, resume_hint=f"resume with --init_from=resume --out_dir={tc.out_dir}"),
        run)


def main(argv: list[str]) -> int:
    def body() -> int:
        tc, mc, explicit = configurator.load_train(argv, __doc__)
        if tc.dry_run:
            dry_run(tc, mc, explicit)
            return 0
        return train(tc, mc, explicit)

    return errors.run_command(body, cleanup=loop.finish)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
