"""
LoRA fine-tuning of a released model on math SFT data, with the shared training loop (../loop.py).

    cd finetune
    python train.py --config configs/Llama-3.1/llama3.1_8b_gsm8k.yaml [--resume_from_checkpoint DIR] [section.key=value ...]
    torchrun --nproc_per_node=8 train.py --config ...        (or: accelerate launch --multi_gpu ... train.py --config ...)

The story of a run: read the YAML (config.py) -> join the process group -> load the base (a Hugging Face
folder, hf_checkpoint.from_hf; bf16 on GPU) -> apply LoRA (lora.py; PiSSA's SVD, or the saved initial factors on a
resume) -> optional activation checkpointing per block -> wrap (DDP / ZeRO-1 / FSDP2: only the adapters
train, so only they are reduced) -> tokenize the SFT data (sft_data.py) -> run loop.run_loop
with this backend's seams:
- lr_at: warmup_ratio, then cosine (or linear/constant) to min_lr_ratio; after a refactor that reset
  Adam's moments, the LR ramps up again over refactor_rewarm_steps;
- evaluate_and_save: eval (eval/loss, eval/token_accuracy, eval/answer_accuracy strict and flexible) every
  eval_steps, a checkpoint-N/ folder every save_steps, checkpoint-best by answer accuracy (by eval/loss
  when answer_eval_samples is 0), save_total_limit;
- an after_step hook: the spectral refactor every refactor_every steps (trainer.name: SpectralRefactorTrainer);
- a checkpoint holds the adapters (model.pt), their optimizer state, the loader position, every rank's
  RNG, the initial factors (lora_init.pt: the PiSSA residual is rebuilt from the original base without
  an SVD) and the adapter in PEFT's format (a PiSSA adapter converted to apply to the original base);
  never the base weights. At the end, the last step's PEFT adapter is also written into output_dir.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import atomic  # noqa: E402
import checkpoint  # noqa: E402
import configurator  # noqa: E402
import errors  # noqa: E402
import hf_checkpoint  # noqa: E402
import loop  # noqa: E402
import optim  # noqa: E402
import parallel  # noqa: E402
from finetune.config import (  # noqa: E402
    ConfigError,
    FinetuneConfig,
    grad_accum_steps,
    interval_steps,
    keys_epilog,
    load_config,
    lora_config,
    resolve_model_path,
    total_steps,
    warmup_steps,
)
from finetune.lora import (  # noqa: E402
    apply_lora,
    load_lora_state_dict,
    lora_init_state,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    save_peft_adapter,
)
from finetune.sft_data import (  # noqa: E402
    DATASETS,
    TEMPLATE_FILE,
    SFTLoader,
    eval_batches,
    evaluate,
    load_examples,
    template_of,
    tokenize_examples,
)
from finetune.spectral import refactor_factors, reset_moments, spectral_refactor  # noqa: E402
from loop import RunState, print0  # noqa: E402
from model import GPT  # noqa: E402

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
BEST = "checkpoint-best"
# the LoRA guide's metric names in wandb/TensorBoard; eval records already use them (eval/loss, ...)
SINK_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
              "tokens_per_sec": "train/tokens_per_sec", "mfu": "train/mfu", "dt_ms": "train/step_ms",
              "memory_peak_gb": "train/memory_peak_gb", "memory_allocated_gb": "train/memory_allocated_gb",
              "memory_host_peak_gb": "train/memory_host_peak_gb", "tokens_seen": "train/tokens_seen",
              **{k: k for k in ("eval/loss", "eval/token_accuracy", "eval/answer_accuracy",
                                "eval/answer_accuracy_flexible")}}


# -- the model: base, adapters, activation checkpointing -------------------------------------------


def build_lora_model(cfg: FinetuneConfig, path: str, device: torch.device, dtype: torch.dtype,
                     init_state: dict[str, torch.Tensor] | None) -> GPT:
    """The base in dtype with fp32 adapters; PiSSA's SVD runs unless init_state (a resume) gives the factors."""
    # the base in its training dtype from the start (an 8B bf16 checkpoint is never widened to fp32 in host
    # memory); the adapters are created in fp32 after this, and PiSSA's SVD runs in fp32 on each slice
    model = hf_checkpoint.from_hf(path, dtype=dtype).to(device)
    apply_lora(model, lora_config(cfg), seed=cfg.training.seed, init_state=init_state)
    return model


# -- the spectral refactor on every parallelism ---------------------------------------------------


@torch.no_grad()
def refactor(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, mode: str,
             d: parallel.Dist) -> dict:
    """spectral_refactor with identical factors on every rank.

    single/DDP/ZeRO-1: every rank holds the full factors; each refactors them, then rank 0's result is
    broadcast (bitwise identical ranks whatever the SVD kernel does). ZeRO-1 applies the optimizer policy
    to the moments this rank owns. FSDP: each factor is gathered, refactored in full on every rank and
    redistributed to the shards; the moments are reset (or kept) shard by shard.
    """
    tr = cfg.trainer
    kw = dict(mode=tr.refactor_mode, lam=tr.refactor_lambda, bound=tr.refactor_bound)
    if mode != "fsdp":
        stats = spectral_refactor(model, optim.local_optimizer(optimizer), opt_state=tr.refactor_opt_state, **kw)
        if d.world_size > 1:
            import torch.distributed as dist

            for p in (p for p in model.parameters() if p.requires_grad):
                dist.broadcast(p.data, src=0)
        return stats | {"ranks_identical": ranks_identical(model, d)}
    from torch.distributed.tensor import distribute_tensor

    n = skipped = 0
    for _, m in lora_modules(model):
        for name in m.names:
            A, B = m.lora_A[name], m.lora_B[name]
            full_A, full_B = parallel.full_tensor(A.data), parallel.full_tensor(B.data)  # collective, same order everywhere
            if not full_A.any() or not full_B.any():
                skipped += 1
                continue
            new_A, new_B, _ = refactor_factors(full_A, full_B, scaling=m.scaling, init=m.init_factors.get(name), **kw)
            for p, new in ((A, new_A), (B, new_B)):
                p.data.copy_(distribute_tensor(new.to(p.dtype), p.device_mesh, p.placements))
                if tr.refactor_opt_state == "reset":
                    reset_moments(optimizer.state.get(p, {}))
            n += 1
    return {"adapters": n, "skipped": skipped, "ranks_identical": ranks_identical(model, d)}


@torch.no_grad()
def ranks_identical(model: torch.nn.Module, d: parallel.Dist) -> bool:
    """Whether every rank holds bitwise the same full adapters (a collective; FSDP gathers them)."""
    if d.world_size == 1:
        return True
    import torch.distributed as dist

    flat = torch.cat([parallel.full_tensor(p.data).flatten().double() for p in lora_parameters(model)])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def refactor_steps(cfg: FinetuneConfig, total: int, warmup: int) -> list[int]:
    """Optimizer steps after which the factors are refactored: every refactor_every from refactor_start."""
    tr = cfg.trainer
    if tr.name != "SpectralRefactorTrainer":
        return []
    start = warmup if tr.refactor_start is None else tr.refactor_start
    return [s for s in range(tr.refactor_every, total, tr.refactor_every) if s >= max(1, start)]


def make_lr(cfg: FinetuneConfig, total: int, warmup: int, refactors: list[int]):
    """lr_at(it): the schedule of training.lr_scheduler_type, re-warmed after each resetting refactor."""
    t, tr = cfg.training, cfg.trainer
    peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
    rewarm = tr.refactor_rewarm_steps if tr.refactor_opt_state == "reset" else 0

    def lr_at(it: int) -> float:
        if t.lr_scheduler_type == "linear" and it >= warmup:
            lr = floor + (peak - floor) * max(0.0, 1 - (it - warmup) / max(1, total - warmup))
        else:
            lr = loop.get_lr(it, peak, warmup, total, floor, decay_lr=t.lr_scheduler_type == "cosine")
        since = [it - s for s in refactors if 0 <= it - s < rewarm]  # steps since a reset, within the ramp
        return lr * (since[0] + 1) / (rewarm + 1) if since else lr

    return lr_at


# -- checkpoints -------------------------------------------------------------------------------------


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoint-N folders in out_dir, oldest first."""
    out = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = CHECKPOINT_RE.fullmatch(name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def prune_checkpoints(out_dir: str, limit: int | None) -> list[str]:
    """Delete the oldest checkpoint-N folders beyond limit (checkpoint-best is not counted); returns them."""
    if limit is None:
        return []
    old = [path for _, path in list_checkpoints(out_dir)[:-limit]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", TEMPLATE_FILE)


def trained_outputs(out_dir: str) -> list[str]:
    """What a finished or interrupted run left in out_dir: checkpoint folders and the final adapter's files."""
    names = [name for name in os.listdir(out_dir) if CHECKPOINT_RE.fullmatch(name) or name == BEST]
    return sorted(names) + [name for name in ADAPTER_FILES if os.path.isfile(os.path.join(out_dir, name))]


def claim_output_dir(t, resume: str | None):
    """Take output_dir for this run (on rank 0; train.py's claim_out_dir for LoRA): its lock (keep the returned
    DirLock while the run lives), then its crash leftovers. A new run never replaces what a trained one left
    unless training.overwrite_output_dir says so (as HF Trainer's overwrite_output_dir); then the old outputs
    go only once every check has passed (overwrite())."""
    held = checkpoint.lock(t.output_dir, "training.output_dir")
    found = trained_outputs(t.output_dir)
    if found and resume is None and not t.overwrite_output_dir:
        raise ConfigError(f"training.output_dir={t.output_dir} holds a trained run ({', '.join(found[:3])}); "
                          f"continue it with --resume_from_checkpoint latest, start over with "
                          f"training.overwrite_output_dir=true (which deletes them), or choose another "
                          f"training.output_dir")
    checkpoint.remove_temps(t.output_dir)
    return held


def overwrite(t, resume: str | None, d: parallel.Dist) -> None:
    """training.overwrite_output_dir: delete the old run's checkpoints and adapter, now that this run has passed
    every check and is about to train (a mistake in its config must not cost the old adapters)."""
    found = trained_outputs(t.output_dir) if resume is None and t.overwrite_output_dir else []
    if d.is_master and found:
        for name in found:
            path = os.path.join(t.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"overwrite_output_dir: deleted {', '.join(found)} from {t.output_dir}", flush=True)
    parallel.barrier(d)


def _steps_text(steps: list[int]) -> str:
    """[100, 200, 300, 400] -> '100, 200, ..., 400 (every 100)'; short lists in full."""
    if len(steps) <= 3:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]} (every {steps[1] - steps[0]})"


def resolve_resume(arg: str | None, output_dir: str) -> str | None:
    """--resume_from_checkpoint as a folder: a checkpoint-N folder as given; 'latest' (training.output_dir) or
    an output_dir: its newest complete checkpoint-N, as HF Trainer's resume_from_checkpoint=True picks it."""
    if arg is None:
        return None
    folder = output_dir if arg == "latest" else arg
    if arg == "latest" or (os.path.isdir(arg) and not os.path.isfile(os.path.join(arg, "state.json"))):
        found = list_checkpoints(folder)
        if not found and arg == "latest":
            raise checkpoint.CheckpointError(f"--resume_from_checkpoint latest: training.output_dir={output_dir} "
                                             f"holds no complete checkpoint-N folder yet; train first")
        if not found:
            raise checkpoint.CheckpointError(f"--resume_from_checkpoint={arg} is not a checkpoint folder (no "
                                             f"state.json) and holds no complete checkpoint-N folder; pass an "
                                             f"output_dir/checkpoint-N folder, or latest")
        return found[-1][1]
    return arg


def read_resume(path: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state, adapters, initial factors) of a checkpoint-N folder, or a CheckpointError."""
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise checkpoint.CheckpointError(f"--resume_from_checkpoint={path} is not a checkpoint folder (no state.json); "
                                         f"pass an output_dir/checkpoint-N folder")
    state = checkpoint.read_state(path)
    if state.get("kind") != "lora":
        raise checkpoint.CheckpointError(f"{path} is not a LoRA fine-tuning checkpoint; pass a checkpoint-N folder "
                                         f"that finetune/train.py wrote")
    return (state, checkpoint.load_tensor_file(os.path.join(path, "model.pt")),
            checkpoint.load_tensor_file(os.path.join(path, "lora_init.pt")))


def write_peft_adapter(model: GPT, cfg: FinetuneConfig, state: dict[str, torch.Tensor], folder: str,
                       template: str) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT format, a PiSSA adapter converted to apply to the
    original base) into an existing folder: written apart, then each renamed in, the config last; and the
    prompt template of training (TEMPLATE_FILE), which inference.py and merge_adapter.py carry on."""
    tmp = os.path.join(folder, ".peft.tmp")
    save_peft_adapter(model, lora_config(cfg), tmp, cfg.model.name_or_path, convert_pissa_to_original_base=True,
                      state=state)
    atomic.write_json(os.path.join(folder, TEMPLATE_FILE), {"template": template})
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp, ignore_errors=True)


# -- the run -------------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> int:
    """Train the adapters of cfg; resume: a checkpoint-N folder to continue exactly."""
    t, ds, tr = cfg.training, cfg.dataset, cfg.trainer
    d = loop.start(t.device)
    mode = parallel.mode(d, zero1=t.parallel == "zero1", fsdp=t.parallel == "fsdp" and d.world_size > 1)
    if mode in ("zero1", "fsdp") and tr.name == "SpectralRefactorTrainer" and tr.refactor_opt_state == "map_first_moment":
        raise ConfigError(f"trainer.refactor_opt_state=map_first_moment needs each rank to hold both factors' "
                          f"moments; with training.parallel={t.parallel} use reset or keep")
    dtype = torch.bfloat16 if t.bf16 and d.device.type == "cuda" else torch.float32
    accum = grad_accum_steps(cfg, d.world_size)
    configurator.check_output_dir(t.output_dir, "training.output_dir")
    lock = parallel.on_master(lambda: claim_output_dir(t, resume), d)  # noqa: F841  (held until we return)
    state, adapters, init_state = read_resume(resume) if resume else (None, None, None)

    # data: templated examples, tokenized with the base model's tokenizer
    model_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = cfg.model.tokenizer or model_path
    template = ds.template or (DATASETS[ds.source]["template"] if ds.source in DATASETS else None)
    train_ex = load_examples(ds.source, ds.split, fields=ds.fields, limit=ds.max_train_samples, template=template)
    template = template_of(train_ex[0]["prompt"])  # the one the data's format chose, when the config names none
    evaluating = t.eval_steps != 0  # training.eval_steps=0: no evaluation (and no checkpoint-best)
    eval_ex = []
    if evaluating:
        source, split, fields = ds.eval_data()
        eval_ex = load_examples(source, split, fields=fields, limit=ds.max_eval_samples, template=template)
    train_tok = tokenize_examples(train_ex, tokenizer, ds.max_length, progress=d.is_master)
    loader = SFTLoader(train_tok, t.per_device_train_batch_size, accum, d.rank, d.world_size, t.seed, d.device)
    eval_ranks = (0, 1) if mode == "fsdp" else (d.rank, d.world_size)  # FSDP: every rank runs every batch
    batches = eval_batches(tokenize_examples(eval_ex, tokenizer, ds.max_length, progress=d.is_master),
                           t.per_device_eval_batch_size, *eval_ranks, d.device) if evaluating else []
    answer_ex = [e for e in eval_ex if e["answer"] is not None][:ds.answer_eval_samples]
    total = total_steps(cfg, loader.steps_per_epoch)
    warmup = warmup_steps(cfg, total)
    save_every = interval_steps(t.save_steps, total)
    eval_every = interval_steps(t.eval_steps or t.save_steps, total) if evaluating else None
    refactors = refactor_steps(cfg, total, warmup)

    # the model: base, adapters (or the saved initial factors), wrapping, optimizer over the adapters
    torch.manual_seed(t.seed)
    try:
        model = build_lora_model(cfg, model_path, d.device, dtype, init_state)
        if adapters is not None:
            load_lora_state_dict(model, {k: v.to(d.device) for k, v in adapters.items()})
    except ValueError as e:
        if resume is None:
            raise
        raise checkpoint.CheckpointError(f"{resume} does not fit this config's model and lora sections "
                                         f"({str(e).splitlines()[0]}); resume with the config it was trained with") from None
    train_model = parallel.wrap(model, d, fsdp=mode == "fsdp", compile=False, cuda_graphs=False, dtype=dtype,
                                activation_checkpointing=t.gradient_checkpointing)
    optimizer = optim.build_optimizer(model, d, zero1=mode == "zero1", lr=t.learning_rate,
                                      betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                                      eps=t.adam_epsilon)
    autocast, _ = loop.precision(dtype, d.device)
    run, best = RunState(), {"step": None, "value": None}
    if state is not None:
        checkpoint.load_into(resume, d, model, optimizer, mode, state)
        loader.load_state_dict(state["loader"])
        run = RunState(state["iter_num"], state["tokens_seen"], state["best_val_loss"])
        best = state["best"]
    else:
        torch.manual_seed(t.seed + d.rank)  # adapter dropout differs by rank; a resume restores the saved RNG

    # the run log
    seq = max(1, round(sum(len(ids) for ids, _ in train_tok) / len(train_tok)))
    fpt = model.flops_per_token(seq)
    n_trainable = sum(p.numel() for p in lora_parameters(model))
    log, peak, _ = loop.open_run_log(
        t.output_dir, d, dtype,
        {"config": {"finetune": cfg.to_dict(), "model": asdict(model.config)},
         "model": {"architecture": model.config.arch_string, "n_params": model.num_params(),
                   "n_params_trainable": n_trainable, "flops_per_token": fpt, "mean_example_tokens": seq},
         "schedule": {"total_steps": total, "warmup_steps": warmup, "save_every": save_every,
                      "eval_every": eval_every, "refactor_steps": refactors, "grad_accum_per_rank": accum,
                      "steps_per_epoch": loader.steps_per_epoch}},
        wandb={"project": t.wandb_project or "nanollm-finetune",
               "name": t.run_name or os.path.basename(os.path.normpath(t.output_dir))} if "wandb" in t.report_to else None,
        tensorboard="tensorboard" in t.report_to, names=SINK_NAMES, tensorboard_subdir="logs")
    print0(d, f"model {model.config.arch_string}: {model.num_params():,} parameters, {n_trainable:,} trainable "
              f"(LoRA r={cfg.lora.r}, init {cfg.lora.init}); {mode} on {d.world_size} x {d.device.type}, "
              f"{str(dtype).removeprefix('torch.')}")
    print0(d, f"{len(train_tok):,} training examples, {loader.steps_per_epoch} steps/epoch of "
              f"{loader.global_batch_size} ({t.per_device_train_batch_size} x {accum} accumulation x "
              f"{d.world_size} processes); {total} steps, warmup {warmup}, "
              + (f"eval every {eval_every}" if evaluating else "no evaluation (training.eval_steps=0)")
              + f", save every {save_every}" + (f"; spectral refactor ({tr.refactor_mode}) after step"
                                               f"{'s' if len(refactors) > 1 else ''} {_steps_text(refactors)}"
                                               if refactors else ""))
    if state is not None:
        loop.announce_resume(d, log, resume, run.iter_num)

    # the seams
    def adapter_state() -> dict[str, torch.Tensor]:
        if mode == "fsdp":  # collective: the full adapters on rank 0
            sd = checkpoint.full_model_state_dict(model, mode)
            return {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
        return {k: v.cpu() for k, v in lora_state_dict(model).items()}

    def save(run: RunState, name: str | None = None) -> str:
        sd = adapter_state()

        def write_extra(tmp: str) -> None:
            checkpoint.save_tensor_file({k: v.cpu() for k, v in lora_init_state(model).items()},
                                        os.path.join(tmp, "lora_init.pt"))
            write_peft_adapter(model, cfg, sd, tmp, template)

        meta = {**asdict(run), "kind": "lora", "config": cfg.to_dict(), "loader": loader.state_dict(), "best": best,
                "base_model": cfg.model.name_or_path}
        path = checkpoint.save(t.output_dir, d, model, optimizer, mode, meta, name=name or f"checkpoint-{run.iter_num}",
                               model_state=lambda: sd, write_extra=write_extra)
        log.event({"iter": run.iter_num, "event": "checkpoint", "path": path})
        print0(d, f"saved {path}")
        return path

    start_iter = run.iter_num
    overwrite(t, resume, d)
    if d.is_master and tr.name == "SpectralRefactorTrainer" and tr.refactor_mode == "balanced" and cfg.lora.init.startswith("pissa"):
        print("warning: trainer.refactor_mode=balanced flattens the whole adapter B A, which under lora.init=pissa "
              "holds the base weights' top singular directions, so every refactor rewrites the base model's "
              "principal components; refactor_mode=delta flattens only what training added (finetune/README.md "
              "has the measurements)", file=sys.stderr, flush=True)

    def evaluate_and_save(run: RunState, done: bool) -> None:
        it = run.iter_num
        if evaluating and (it % eval_every == 0 or done) and not (state is not None and it == start_iter):
            metrics = evaluate(model, batches, answer_ex, tokenizer, max_new_tokens=ds.max_new_tokens,
                               batch_size=t.per_device_eval_batch_size, autocast=autocast, d=d, fsdp=mode == "fsdp",
                               progress=d.is_master)
            log.evaluation({"iter": it, **metrics, "tokens_seen": run.tokens_seen})
            print0(d, f"eval step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            run.best_val_loss = min(run.best_val_loss, metrics["eval/loss"])
            key = "eval/answer_accuracy" if "eval/answer_accuracy" in metrics else "eval/loss"
            value = metrics[key] if key != "eval/loss" else -metrics[key]  # higher is better
            if it > 0 and (best["value"] is None or value > best["value"]):
                best.update(step=it, value=value, metric=key)
                save(run, BEST)
        if it > start_iter and (it % save_every == 0 or done):
            save(run)
            if d.is_master:
                for path in prune_checkpoints(t.output_dir, t.save_total_limit):
                    log.event({"iter": it, "event": "checkpoint_removed", "path": path})
        if done:  # the final adapter in output_dir itself, as merge_adapter.py expects (a resume from the last
            # checkpoint writes it too: a run killed after that save never got to)
            sd = adapter_state()
            if d.is_master:
                write_peft_adapter(model, cfg, sd, t.output_dir, template)
                log.event({"iter": it, "event": "final_adapter", "path": t.output_dir})

    def spectral_refactor_hook(run: RunState) -> None:
        if run.iter_num in refactors:
            stats = refactor(model, optimizer, cfg, mode, d)
            log.event({"iter": run.iter_num, "event": "spectral_refactor", "mode": tr.refactor_mode, **stats})

    return loop.run_loop(loop.Loop(
        d=d, model=model, train_model=train_model, optimizer=optimizer, loader=loader, log=log, accum=accum,
        max_iters=total, lr_at=make_lr(cfg, total, warmup, refactors), evaluate_and_save=evaluate_and_save,
        save=save, after_step=[spectral_refactor_hook] if refactors else [], grad_clip=t.max_grad_norm,
        autocast=autocast, log_interval=t.logging_steps, flops_per_token=fpt, peak_flops=peak,
        resume_hint=f"saved {t.output_dir}/checkpoint-{{iter}}: resume with --resume_from_checkpoint latest"), run)


def main(argv: list[str]) -> int:
    def body() -> int:
        parser = errors.ArgumentParser(prog="train.py", description="LoRA fine-tuning from a YAML config.",
                                       usage="train.py [-h] --config CONFIG [--resume_from_checkpoint DIR] "
                                             "[section.key=value ...]", epilog=keys_epilog())
        parser.add_argument("--config", required=True, help="a YAML config (configs/...)")
        parser.add_argument("--resume_from_checkpoint", default=None,
                            help="a checkpoint-N folder; 'latest' or an output_dir: its newest complete checkpoint-N")
        args, overrides = parser.parse_known_args(argv)
        for arg in overrides:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and "." not in flag:
                raise ConfigError(f"unknown flag {flag}{configurator.suggest(flag, ['--config', '--resume_from_checkpoint'])}"
                                  f"; config values are written section.key=value")
        cfg = load_config(args.config, overrides)
        return finetune(cfg, resolve_resume(args.resume_from_checkpoint, cfg.training.output_dir))

    return errors.run_command(body, cleanup=loop.finish)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
