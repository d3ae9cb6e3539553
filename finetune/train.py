"""
LoRA fine-tuning of a released model on math SFT data, with the shared training loop (../loop.py).

    cd finetune
    python train.py --config configs/Llama-3.1/llama3.1_8b_gsm8k.yaml [--resume_from_checkpoint DIR] [section.key=value ...]
    torchrun --nproc_per_node=8 train.py --config ...        (or: accelerate launch --multi_gpu ... train.py --config ...)

The story of a run, one function per phase, as ../train.py's: read the YAML (config.py) -> launch (join the
process group, the parallel layout, the dtype) -> what_to_train (the SFT data tokenized with the base's
tokenizer, sft_data.py; the schedule) -> build_model (the base, hf_checkpoint.from_hf, bf16 on GPU; LoRA,
PiSSA's SVD or a resume's saved initial factors; wrapped DDP / ZeRO-1 / FSDP2 with optional activation
checkpointing: build_lora.py) -> a resume's state and the run log (../build.py, shared with pretraining) ->
loop.run_loop with this backend's seams:
- lr_at: warmup_ratio, then cosine (or linear/constant) to min_lr_ratio; after a refactor that reset
  Adam's moments, the LR ramps up again over refactor_rewarm_steps;
- evaluate_and_save: eval (eval/loss, eval/token_accuracy, eval/answer_accuracy strict and flexible:
  sft_eval.py) every eval_steps, a checkpoint-N/ folder every save_steps, checkpoint-best by answer accuracy
  (by eval/loss when answer_eval_samples is 0), save_total_limit;
- after_step: spectral.refactor_hooks, the spectral refactor every refactor_every steps on any layout
  (trainer.name: SpectralRefactorTrainer);
- a checkpoint holds the adapters (model.pt), their optimizer state, the loader position, every rank's
  RNG, the initial factors (lora_init.pt: the PiSSA residual is rebuilt from the original base without
  an SVD) and the adapter in PEFT's format (a PiSSA adapter converted to apply to the original base);
  never the base weights. At the end, the last step's PEFT adapter is also written into output_dir.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import atomic  # noqa: E402
import build  # noqa: E402
import checkpoint  # noqa: E402
import configurator  # noqa: E402
import errors  # noqa: E402
import hf_checkpoint  # noqa: E402
import loop  # noqa: E402
import parallel  # noqa: E402
import runlog  # noqa: E402
from finetune import build_lora, spectral  # noqa: E402
from finetune.config import (  # noqa: E402
    ConfigError,
    FinetuneConfig,
    TrainingArgs,
    grad_accum_steps,
    interval_steps,
    keys_epilog,
    load_config,
    lora_config,
    resolve_model_path,
    total_steps,
    warmup_steps,
)
from finetune.lora import LoRAConfig, lora_init_state, lora_parameters, lora_state_dict, save_peft_adapter  # noqa: E402
from finetune.sft_data import (  # noqa: E402
    DATASETS,
    TEMPLATE_FILE,
    SFTLoader,
    eval_batches,
    load_examples,
    template_of,
    tokenize_examples,
)
from finetune.sft_eval import evaluate  # noqa: E402
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


def make_lr(scheduler: str, peak: float, floor: float, total: int, warmup: int, refactors: list[int],
            rewarm: int) -> Callable[[int], float]:
    """lr_at(it): Hugging Face Trainer's schedules (get_scheduler): step it < warmup at peak * it / warmup (0 at
    step 0), then training.lr_scheduler_type (cosine, linear or constant) from peak to floor; re-warmed linearly
    over `rewarm` steps after each refactor (0: a refactor that keeps the moments)."""

    def lr_at(it: int) -> float:
        if it < warmup:
            lr = peak * it / warmup  # HF's ramp, not loop.get_lr's (it + 1) / (warmup + 1): its keys, its steps
        elif scheduler == "linear":
            lr = floor + (peak - floor) * max(0.0, 1 - (it - warmup) / max(1, total - warmup))
        else:
            lr = loop.get_lr(it, peak, warmup, total, floor, decay_lr=scheduler == "cosine")
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


def claim_output_dir(output_dir: str, overwrite_output_dir: bool, resume: str | None) -> checkpoint.DirLock:
    """Take output_dir for this run (on rank 0; build.claim_out_dir). A new run never replaces what a trained
    one left unless training.overwrite_output_dir says so (as HF Trainer's overwrite_output_dir); then the old
    outputs go only once every check has passed (overwrite())."""
    def refusal(found: list[str]) -> ConfigError:
        return ConfigError(f"training.output_dir={output_dir} holds a trained run ({', '.join(found[:3])}); "
                           f"continue it with --resume_from_checkpoint latest, start over with "
                           f"training.overwrite_output_dir=true (which deletes them), or choose another "
                           f"training.output_dir")

    return build.claim_out_dir(output_dir, "training.output_dir", lambda: trained_outputs(output_dir),
                               refusal if resume is None and not overwrite_output_dir else None)


def overwrite(output_dir: str, overwrite_output_dir: bool, resume: str | None, d: parallel.Dist) -> None:
    """training.overwrite_output_dir: delete the old run's checkpoints and adapter, now that this run has passed
    every check and is about to train (a mistake in its config must not cost the old adapters)."""
    found = trained_outputs(output_dir) if resume is None and overwrite_output_dir else []
    build.overwrite_out_dir(output_dir, found, d, f"overwrite_output_dir: deleted {', '.join(found)} from {output_dir}")


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


def write_peft_adapter(model: GPT, lora: LoRAConfig, base_model: str, state: dict[str, torch.Tensor], folder: str,
                       template: str) -> None:
    """adapter_model.safetensors + adapter_config.json (PEFT format, a PiSSA adapter converted to apply to the
    original base base_model) into an existing folder: written apart, then each renamed in, the config last;
    and the prompt template of training (TEMPLATE_FILE), which inference.py and merge_adapter.py carry on."""
    tmp = os.path.join(folder, ".peft.tmp")
    save_peft_adapter(model, lora, tmp, base_model, convert_pissa_to_original_base=True, state=state)
    atomic.write_json(os.path.join(folder, TEMPLATE_FILE), {"template": template})
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    shutil.rmtree(tmp, ignore_errors=True)


# -- the run: launch -> what to train -> build -> the loop ---------------------------------------------


def launch(t: TrainingArgs, map_first_moment: bool) -> tuple[parallel.Dist, parallel.Layout, torch.dtype]:
    """Join the process group and check the launch: (dist, parallel layout, compute dtype)."""
    d = loop.start(t.device)
    layout = parallel.layout(d, zero1=t.parallel == "zero1", fsdp=t.parallel == "fsdp" and d.world_size > 1)
    if layout.per_rank_optimizer_state and map_first_moment:
        raise ConfigError(f"trainer.refactor_opt_state=map_first_moment needs each rank to hold both factors' "
                          f"moments; with training.parallel={t.parallel} use reset or keep")
    return d, layout, torch.bfloat16 if t.bf16 and d.device.type == "cuda" else torch.float32


@dataclass
class Data:
    """What a run trains and evaluates on, and its schedule in optimizer steps."""

    model_path: str  # the base's Hugging Face folder
    tokenizer: str
    template: str  # the prompt template the examples were rendered with
    train_tok: list[tuple[list[int], list[int]]]
    loader: SFTLoader
    batches: list  # the eval batches this rank runs; [] without evaluation
    answer_examples: list[dict]  # eval examples scored by greedy decoding
    total: int
    warmup: int
    save_every: int
    eval_every: int | None  # None: no evaluation (training.eval_steps=0)
    refactors: list[int]  # steps after which the spectral refactor runs


def what_to_train(cfg: FinetuneConfig, d: parallel.Dist, layout: parallel.Layout, accum: int) -> Data:
    """The templated examples tokenized with the base model's tokenizer, the loader, the eval set and the
    schedule."""
    t, ds, tr = cfg.training, cfg.dataset, cfg.trainer
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
    eval_ranks = (0, 1) if layout.shard_params else (d.rank, d.world_size)  # FSDP: every rank runs every batch
    batches = eval_batches(tokenize_examples(eval_ex, tokenizer, ds.max_length, progress=d.is_master),
                           t.per_device_eval_batch_size, *eval_ranks, d.device) if evaluating else []
    answer_ex = [e for e in eval_ex if e["answer"] is not None][:ds.answer_eval_samples]
    total = total_steps(cfg, loader.steps_per_epoch)
    warmup = warmup_steps(cfg, total)
    refactors = (spectral.refactor_steps(tr.refactor_every, tr.refactor_start, total, warmup)
                 if tr.name == "SpectralRefactorTrainer" else [])
    return Data(model_path, tokenizer, template, train_tok, loader, batches, answer_ex, total, warmup,
                interval_steps(t.save_steps, total),
                interval_steps(t.eval_steps or t.save_steps, total) if evaluating else None, refactors)


def build_model(cfg: FinetuneConfig, model_path: str, d: parallel.Dist, layout: parallel.Layout, dtype: torch.dtype,
                resume: str | None, init_state: dict | None,
                adapters: dict | None) -> tuple[GPT, torch.nn.Module, torch.optim.Optimizer]:
    """(model, train_model, optimizer): the base in dtype with fp32 adapters (PiSSA's SVD, or a resume's saved
    initial factors and trained adapters), wrapped for the layout; AdamW over the adapters (build_lora.py)."""
    t = cfg.training
    torch.manual_seed(t.seed)
    try:
        # the base in its training dtype from the start: an 8B bf16 checkpoint is never widened to fp32 on the host
        base = hf_checkpoint.from_hf(model_path, dtype=dtype).to(d.device)
        model = build_lora.lora_model(base, lora_config(cfg), t.seed, init_state, adapters)
    except ValueError as e:
        if resume is None:
            raise
        raise checkpoint.CheckpointError(f"{resume} does not fit this config's model and lora sections "
                                         f"({str(e).splitlines()[0]}); resume with the config it was trained with") from None
    train_model, optimizer = build_lora.wrap_and_optimizer(
        model, d, layout, dtype, gradient_checkpointing=t.gradient_checkpointing, lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon)
    return model, train_model, optimizer


def open_log(cfg: FinetuneConfig, d: parallel.Dist, layout: parallel.Layout, dtype: torch.dtype, model: GPT,
             data: Data, accum: int) -> tuple[runlog.RunLog, float | None, int]:
    """(run log, peak FLOP/s or None, FLOPs per token): the log's header written (build.model_summary, as
    pretraining's) and the run's shape printed."""
    t, tr = cfg.training, cfg.trainer
    seq = max(1, round(sum(len(ids) for ids, _ in data.train_tok) / len(data.train_tok)))
    fpt = model.flops_per_token(seq)
    n_trainable = sum(p.numel() for p in lora_parameters(model))
    log, peak, _ = loop.open_run_log(
        t.output_dir, d, dtype,
        {"config": {"finetune": cfg.to_dict(), "model": asdict(model.config)},
         "model": build.model_summary(model, fpt, n_params_trainable=n_trainable, mean_example_tokens=seq),
         "schedule": {"total_steps": data.total, "warmup_steps": data.warmup, "save_every": data.save_every,
                      "eval_every": data.eval_every, "refactor_steps": data.refactors, "grad_accum_per_rank": accum,
                      "steps_per_epoch": data.loader.steps_per_epoch}},
        wandb={"project": t.wandb_project or "nanollm-finetune",
               "name": t.run_name or os.path.basename(os.path.normpath(t.output_dir))} if "wandb" in t.report_to else None,
        tensorboard="tensorboard" in t.report_to, names=SINK_NAMES, tensorboard_subdir="logs")
    print0(d, f"model {model.config.arch_string}: {model.num_params():,} parameters, {n_trainable:,} trainable "
              f"(LoRA r={cfg.lora.r}, init {cfg.lora.init}); {layout.name} on {d.world_size} x {d.device.type}, "
              f"{str(dtype).removeprefix('torch.')}")
    refactors = data.refactors
    print0(d, f"{len(data.train_tok):,} training examples, {data.loader.steps_per_epoch} steps/epoch of "
              f"{data.loader.global_batch_size} ({t.per_device_train_batch_size} x {accum} accumulation x "
              f"{d.world_size} processes); {data.total} steps, warmup {data.warmup}, "
              + (f"eval every {data.eval_every}" if data.eval_every else "no evaluation (training.eval_steps=0)")
              + f", save every {data.save_every}" + (f"; spectral refactor ({tr.refactor_mode}) after step"
                                                     f"{'s' if len(refactors) > 1 else ''} {_steps_text(refactors)}"
                                                     if refactors else ""))
    return log, peak, fpt


@dataclass
class Outputs:
    """What a run writes into output_dir: checkpoint-N folders (save_total_limit of them), checkpoint-best and,
    at the end, the PEFT adapter itself."""

    d: parallel.Dist
    layout: parallel.Layout
    model: GPT
    optimizer: torch.optim.Optimizer
    loader: SFTLoader
    log: runlog.RunLog
    output_dir: str
    save_total_limit: int | None
    config: dict  # the run's config, recorded in every checkpoint
    lora: LoRAConfig
    base_model: str  # model.name_or_path, recorded for the PEFT adapter
    template: str
    best: dict  # step, value (higher is better) and metric of checkpoint-best

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The full adapters on CPU (a collective under FSDP: rank 0 gets them gathered)."""
        if self.layout.shard_params:
            sd = checkpoint.full_model_state_dict(self.model, self.layout)
            return {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k}
        return {k: v.cpu() for k, v in lora_state_dict(self.model).items()}

    def save(self, run: RunState, name: str | None = None) -> str:
        sd = self.adapter_state()

        def write_extra(tmp: str) -> None:
            checkpoint.save_tensor_file({k: v.cpu() for k, v in lora_init_state(self.model).items()},
                                        os.path.join(tmp, "lora_init.pt"))
            write_peft_adapter(self.model, self.lora, self.base_model, sd, tmp, self.template)

        meta = {**asdict(run), "kind": "lora", "config": self.config, "loader": self.loader.state_dict(),
                "best": self.best, "base_model": self.base_model}
        path = checkpoint.save(self.output_dir, self.d, self.model, self.optimizer, self.layout, meta,
                               name=name or f"checkpoint-{run.iter_num}", model_state=lambda: sd,
                               write_extra=write_extra)
        self.log.event({"iter": run.iter_num, "event": "checkpoint", "path": path})
        print0(self.d, f"saved {path}")
        return path

    def prune(self, it: int) -> None:
        if self.d.is_master:
            for path in prune_checkpoints(self.output_dir, self.save_total_limit):
                self.log.event({"iter": it, "event": "checkpoint_removed", "path": path})

    def final_adapter(self, it: int) -> None:
        """The final adapter in output_dir itself, as merge_adapter.py expects (a resume from the last checkpoint
        writes it too: a run killed after that save never got to)."""
        sd = self.adapter_state()
        if self.d.is_master:
            write_peft_adapter(self.model, self.lora, self.base_model, sd, self.output_dir, self.template)
            self.log.event({"iter": it, "event": "final_adapter", "path": self.output_dir})


def evaluate_and_save(out: Outputs, evaluate_now: Callable[[], dict[str, float]] | None, eval_every: int | None,
                      save_every: int, start_iter: int, resumed: bool) -> Callable[[RunState, bool], None]:
    """loop.Loop.evaluate_and_save: evaluate_now() every eval_every steps (checkpoint-best when it improves),
    a checkpoint-N every save_every, and at the end the final adapter."""
    def seam(run: RunState, done: bool) -> None:
        it = run.iter_num
        if evaluate_now is not None and (it % eval_every == 0 or done) and not (resumed and it == start_iter):
            metrics = evaluate_now()
            out.log.evaluation({"iter": it, **metrics, "tokens_seen": run.tokens_seen})
            print0(out.d, f"eval step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            run.best_val_loss = min(run.best_val_loss, metrics["eval/loss"])
            key = "eval/answer_accuracy" if "eval/answer_accuracy" in metrics else "eval/loss"
            value = metrics[key] if key != "eval/loss" else -metrics[key]  # higher is better
            if it > 0 and (out.best["value"] is None or value > out.best["value"]):
                out.best.update(step=it, value=value, metric=key)
                out.save(run, BEST)
        if it > start_iter and (it % save_every == 0 or done):
            out.save(run)
            out.prune(it)
        if done:
            out.final_adapter(it)

    return seam


def finetune(cfg: FinetuneConfig, resume: str | None = None) -> int:
    """Train the adapters of cfg; resume: a checkpoint-N folder to continue exactly."""
    t, ds, tr = cfg.training, cfg.dataset, cfg.trainer
    spectral_run = tr.name == "SpectralRefactorTrainer"
    d, layout, dtype = launch(t, spectral_run and tr.refactor_opt_state == "map_first_moment")
    accum = grad_accum_steps(cfg, d.world_size)
    configurator.check_output_dir(t.output_dir, "training.output_dir")
    lock = parallel.on_master(lambda: claim_output_dir(t.output_dir, t.overwrite_output_dir, resume), d)  # noqa: F841  (held until we return)
    state, adapters, init_state = read_resume(resume) if resume else (None, None, None)
    data = what_to_train(cfg, d, layout, accum)
    model, train_model, optimizer = build_model(cfg, data.model_path, d, layout, dtype, resume, init_state, adapters)
    autocast, _ = loop.precision(dtype, d.device)
    run = build.resume(resume, state, d, layout, model, optimizer, data.loader, t.seed)
    log, peak, fpt = open_log(cfg, d, layout, dtype, model, data, accum)
    if state is not None:
        loop.announce_resume(d, log, resume, run.iter_num)
    out = Outputs(d, layout, model, optimizer, data.loader, log, t.output_dir, t.save_total_limit, cfg.to_dict(),
                  lora_config(cfg), cfg.model.name_or_path, data.template,
                  state["best"] if state is not None else {"step": None, "value": None})
    start_iter = run.iter_num
    overwrite(t.output_dir, t.overwrite_output_dir, resume, d)
    if d.is_master and spectral_run and tr.refactor_mode == "balanced" and cfg.lora.init.startswith("pissa"):
        print("warning: trainer.refactor_mode=balanced flattens the whole adapter B A, which under lora.init=pissa "
              "holds the base weights' top singular directions, so every refactor rewrites the base model's "
              "principal components; refactor_mode=delta flattens only what training added (finetune/README.md "
              "has the measurements)", file=sys.stderr, flush=True)
    evaluate_now = functools.partial(
        evaluate, model, data.batches, data.answer_examples, data.tokenizer, max_new_tokens=ds.max_new_tokens,
        batch_size=t.per_device_eval_batch_size, autocast=autocast, d=d, fsdp=layout.shard_params,
        progress=d.is_master) if data.eval_every else None
    hooks = spectral.refactor_hooks(model, optimizer, layout, d, data.refactors, log.event, mode=tr.refactor_mode,
                                    lam=tr.refactor_lambda, bound=tr.refactor_bound, opt_state=tr.refactor_opt_state)
    lr_at = make_lr(t.lr_scheduler_type, t.learning_rate, t.learning_rate * t.min_lr_ratio, data.total, data.warmup,
                    data.refactors, spectral.rewarm_steps(tr.refactor_opt_state, tr.refactor_rewarm_steps))
    return loop.run_loop(loop.Loop(
        d=d, model=model, train_model=train_model, optimizer=optimizer, loader=data.loader, log=log, accum=accum,
        max_iters=data.total, lr_at=lr_at,
        evaluate_and_save=evaluate_and_save(out, evaluate_now, data.eval_every, data.save_every, start_iter,
                                            state is not None),
        save=out.save, after_step=hooks, grad_clip=t.max_grad_norm, autocast=autocast, log_interval=t.logging_steps,
        flops_per_token=fpt, peak_flops=peak,
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
