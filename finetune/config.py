"""
Typed YAML configuration of a LoRA fine-tuning run (configs/Llama-3.1/*.yaml reproduce the Llama-3.1 LoRA guide).

    python train.py --config configs/Llama-3.1/llama3.1_8b_gsm8k.yaml training.learning_rate=1e-4

A config has five sections, each a dataclass below: model, lora, dataset, training, trainer. Every key
is typed and known: an unknown key is one ConfigError line with the closest known name, a value of
the wrong type one line with the expected type. Overrides are `section.key=value` (a leading `--` is
accepted) and are parsed as YAML values, so lists work: `lora.target_modules=[q_proj,v_proj]`.

Counts that depend on the world size or the data (gradient accumulation from an effective batch,
save/eval intervals given as fractions of training) are derived by the functions at the bottom,
not stored: the file says what the user asked for.

Importing this module pulls in no torch; load_config() and lora_config() import finetune/lora.py
(and spectral.py for a SpectralRefactorTrainer) to reuse their own argument checks.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields

import yaml

from configurator import coerce, format_keys, keys_help, suggest
from errors import ConfigError
from families import LORA_TARGETS

TRAINERS = ("Trainer", "SpectralRefactorTrainer")
SCHEDULES = ("cosine", "linear", "constant")
REPORT_TO = ("none", "wandb", "tensorboard")
PARALLEL = ("ddp", "zero1", "fsdp")
# Keys of Hugging Face's TrainingArguments (and peft) a user may carry over, that mean something else here or
# nothing: the hint names ours.
HF_KEYS = {
    "evaluation_strategy": "evaluation here is by steps: set training.eval_steps (0 turns it off)",
    "eval_strategy": "evaluation here is by steps: set training.eval_steps (0 turns it off)",
    "save_strategy": "checkpoints here are by steps: set training.save_steps",
    "logging_strategy": "logging here is by steps: set training.logging_steps",
    "optim": "the optimizer is always AdamW (torch's fused kernel): set training.adam_beta1, adam_beta2, "
             "adam_epsilon and weight_decay",
    "lr": "the key is training.learning_rate",
    "lora_alpha": "the key is lora.alpha",
    "lora_dropout": "the key is lora.dropout",
    "init_lora_weights": "the key is lora.init (default, gaussian, pissa or pissa_niter_N)",
    "model_name_or_path": "the key is model.name_or_path",
    "per_gpu_train_batch_size": "the key is training.per_device_train_batch_size",
    "fp16": "training runs in bf16 on GPUs (training.bf16) and fp32 on CPUs; fp16 is not offered",
    "resume_from_checkpoint": "pass it on the command line: --resume_from_checkpoint latest (or a checkpoint folder)",
}
# Keys of Hugging Face's TrainingArguments that the Llama-3.1 LoRA guide mentions but that mean nothing here: one line why.
UNSUPPORTED = {
    "dataloader_num_workers": "the SFT loader pads its batches in-process from tokenized examples held in "
                              "memory, so there are no loader workers; remove the key",
    "dataloader_prefetch_factor": "the SFT loader has no worker processes to prefetch; remove the key",
    "preprocessing_num_workers": "tokenization runs once, in-process, before training; remove the key",
}


@dataclass
class ModelArgs:
    """The base model: a Hugging Face folder (or hub id) loaded through hf_checkpoint.from_hf."""

    name_or_path: str = ""  # the base: a Hugging Face folder or hub id
    tokenizer: str | None = None  # a tokenizer folder; None: the model's folder


@dataclass
class LoraArgs:
    """Adapters; see finetune/lora.py (HF target names, scaling alpha/r or alpha/sqrt(r))."""

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scale numerator: alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on each adapter's input; 0: off
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the linears adapted, by their Hugging Face names
    use_rslora: bool = False  # scale by alpha / sqrt(r) (rank-stabilized LoRA)
    init: str = "default"  # default | gaussian | pissa | pissa_niter_N


@dataclass
class DatasetArgs:
    """SFT data (finetune/sft_data.py): where it comes from, its fields, template and length bound."""

    source: str = "gsm8k"  # gsm8k | metamathqa | a local .json/.jsonl/.parquet file
    split: str = "train"  # the split of a hub dataset trained on
    fields: dict[str, str] | None = None  # {"prompt": ..., "response": ..., "answer": ...} for local files
    template: str | None = None  # a sft_data.TEMPLATES name; None: the dataset's own
    max_length: int = 1024  # tokens per example (prompt + response + EOS); longer ones are truncated
    max_train_samples: int | None = None  # the first N training examples only
    eval_source: str | None = None  # None: source (MetaMathQA has no test split: point this at gsm8k)
    eval_split: str = "test"  # the split evaluated on
    eval_fields: dict[str, str] | None = None  # None: fields
    max_eval_samples: int | None = None  # examples for eval/loss and eval/token_accuracy
    answer_eval_samples: int = 200  # examples greedily decoded for eval/answer_accuracy; 0: skip
    max_new_tokens: int = 256  # generation budget per answer

    def eval_data(self) -> tuple[str, str, dict[str, str] | None]:
        """(source, split, fields) of the eval set: source's fields unless eval_source names another dataset."""
        return (self.eval_source or self.source, self.eval_split,
                self.eval_fields or (None if self.eval_source else self.fields))


@dataclass
class TrainingArgs:
    """How the adapters are trained; names follow Hugging Face's TrainingArguments where one exists."""

    output_dir: str = "outputs/run"  # the run's folder: checkpoint-N folders, the final adapter, the run log
    overwrite_output_dir: bool = False  # let a new run delete the checkpoints and adapter output_dir holds
    num_train_epochs: int = 1  # passes over the training data (unless max_steps > 0)
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides num_train_epochs)
    per_device_train_batch_size: int = 4  # examples per micro-batch per process
    per_device_eval_batch_size: int = 8  # examples per evaluation batch per process
    gradient_accumulation_steps: int | None = None  # None: derived from effective_batch_size
    effective_batch_size: int | None = None  # examples per optimizer step over all ranks
    learning_rate: float = 1e-4  # peak learning rate of the adapters
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.0  # fraction of the optimizer steps spent warming up linearly
    min_lr_ratio: float = 0.0  # the decay's floor, as a fraction of learning_rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapters
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # 0: no clipping
    bf16: bool = True  # bf16 base weights and activations on GPU (adapters stay fp32); CPU runs fp32
    gradient_checkpointing: bool = False  # non-reentrant activation checkpointing per block
    parallel: str = "ddp"  # ddp | zero1 | fsdp, when launched on several processes
    logging_steps: int = 10  # optimizer steps between log records
    eval_steps: float | None = None  # < 1: a fraction of training; >= 1: a count; 0: no evaluation; None: save_steps
    save_steps: float = 0.1  # as eval_steps
    save_total_limit: int | None = None  # keep the newest N checkpoint-N folders (checkpoint-best kept apart)
    seed: int = 42  # seed of the adapters' init, the data order and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    report_to: list[str] = field(default_factory=lambda: ["none"])  # none | wandb | tensorboard
    run_name: str | None = None  # None: the output folder's name
    wandb_project: str | None = None  # the wandb project; None: nanollm-finetune
@dataclass
class TrainerArgs:
    """The Llama-3.1 LoRA guide's SpectralRefactorTrainer: refactor the LoRA factors every refactor_every steps."""

    name: str = "Trainer"  # Trainer | SpectralRefactorTrainer
    refactor_every: int = 200  # optimizer steps between refactors
    refactor_start: int | None = None  # first step a refactor may run at; None: after the LR warmup
    # delta by measurement (finetune/README.md): balanced, the guide's mode, rewrites a PiSSA adapter's base
    # directions; it stays available to reproduce the guide
    refactor_mode: str = "delta"  # delta | exact | clamp | balanced (finetune/spectral.py)
    refactor_lambda: float = 0.85  # balanced: S~ = (1 - lambda) S + lambda mean(S)
    refactor_bound: float | None = None  # clamp: bound on the spectral norm of scaling * B A
    refactor_opt_state: str = "reset"  # reset | map_first_moment | keep
    refactor_rewarm_steps: int = 10  # after a reset, the LR ramps up again over this many steps


def keys_epilog() -> str:
    """The --help table of every YAML key: section.key=default and its meaning (from the comments above)."""
    return ("YAML keys (a config's sections; section.key=value after the flags overrides one; the default "
            "after =):\n" + format_keys(keys_help([FinetuneConfig]), dashes=""))


@dataclass
class FinetuneConfig:
    """A whole run: one attribute per YAML section."""

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    dataset: DatasetArgs = field(default_factory=DatasetArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    trainer: TrainerArgs = field(default_factory=TrainerArgs)

    def to_dict(self) -> dict:
        """Plain nested dict (for the run log and checkpoints)."""
        return asdict(self)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(FinetuneConfig)[f.name] for f in fields(FinetuneConfig)}


def _coerce(key: str, value: typing.Any, annotation: typing.Any) -> typing.Any:
    """configurator.coerce plus the shapes YAML adds: lists of strings, string maps, counts-or-fractions."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if type(None) in args and value is None:
        return None
    inner = [a for a in args if a is not type(None)] if type(None) in args else [annotation]
    target = inner[0] if len(inner) == 1 else annotation
    origin, args = typing.get_origin(target), typing.get_args(target)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}={value!r} must be a list of strings, e.g. [q_proj, v_proj]")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(f"{key}={value!r} must be a mapping of names to strings, e.g. {{prompt: q, response: a}}")
        return dict(value)
    if target is float and key.endswith("_steps") and isinstance(value, int) and not isinstance(value, bool):
        return value  # a count stays an int (save_steps: 500), a fraction is a float (save_steps: 0.1)
    return coerce(key, value, annotation)


def _build(section: str, values: typing.Any) -> typing.Any:
    schema = SECTIONS[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(schema)
    known = [f.name for f in fields(schema)]
    kwargs = {}
    for key, value in values.items():
        name = f"{section}.{key}"
        if key in UNSUPPORTED:
            raise ConfigError(f"{name} is not supported: {UNSUPPORTED[key]}")
        if key not in hints:
            home = [s for s, schema in SECTIONS.items() if key in {f.name for f in fields(schema)}]
            if home:  # a key of another section
                raise ConfigError(f"unknown config key '{name}': {key} belongs to section {home[0]}; write "
                                  f"{home[0]}.{key}")
            if key in HF_KEYS:
                raise ConfigError(f"unknown config key '{name}' (a Hugging Face key): {HF_KEYS[key]}")
            raise ConfigError(f"unknown config key '{name}'{suggest(str(key), known)}")
        kwargs[key] = _coerce(name, value, hints[key])
    return schema(**kwargs)


def _check(cfg: FinetuneConfig) -> None:
    """Value checks that need no data, no GPU and no world size; each failure is one line."""
    m, lo, ds, t, tr = cfg.model, cfg.lora, cfg.dataset, cfg.training, cfg.trainer
    if not m.name_or_path:
        raise ConfigError("model.name_or_path is missing; set it to a Hugging Face model folder or hub id")
    unknown = [x for x in lo.target_modules if x not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"lora.target_modules has unknown name '{unknown[0]}'{suggest(unknown[0], LORA_TARGETS)}; "
                          f"choose among {', '.join(LORA_TARGETS)}")
    positive = {"lora.r": lo.r, "dataset.max_length": ds.max_length, "dataset.max_new_tokens": ds.max_new_tokens,
                "training.num_train_epochs": t.num_train_epochs, "training.logging_steps": t.logging_steps,
                "training.per_device_train_batch_size": t.per_device_train_batch_size,
                "training.per_device_eval_batch_size": t.per_device_eval_batch_size,
                "training.learning_rate": t.learning_rate, "trainer.refactor_every": tr.refactor_every,
                "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "training.effective_batch_size": t.effective_batch_size, "training.save_steps": t.save_steps,
                "training.save_total_limit": t.save_total_limit,
                "dataset.max_train_samples": ds.max_train_samples, "dataset.max_eval_samples": ds.max_eval_samples}
    for name, v in positive.items():
        if v is not None and not v > 0:
            raise ConfigError(f"{name}={v} must be > 0")
    nonneg = {"training.warmup_ratio": t.warmup_ratio, "training.weight_decay": t.weight_decay,
              "training.eval_steps": t.eval_steps if t.eval_steps is not None else 0,
              "training.max_grad_norm": t.max_grad_norm, "dataset.answer_eval_samples": ds.answer_eval_samples,
              "trainer.refactor_rewarm_steps": tr.refactor_rewarm_steps, "training.adam_epsilon": t.adam_epsilon}
    for name, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{name}={v} must be >= 0")
    for name, v in {"training.warmup_ratio": t.warmup_ratio, "training.min_lr_ratio": t.min_lr_ratio,
                    "training.adam_beta1": t.adam_beta1, "training.adam_beta2": t.adam_beta2,
                    "lora.dropout": lo.dropout}.items():
        if not 0 <= v < 1 and not (name == "training.min_lr_ratio" and v == 1):
            raise ConfigError(f"{name}={v} must be in [0, 1)")
    for name, v in {"training.save_steps": t.save_steps, "training.eval_steps": t.eval_steps}.items():
        if isinstance(v, float) and v >= 1 and not v.is_integer():
            raise ConfigError(f"{name}={v} must be a fraction of training below 1 or a whole number of steps")
    choices = {"training.lr_scheduler_type": (t.lr_scheduler_type, SCHEDULES), "trainer.name": (tr.name, TRAINERS),
               "training.parallel": (t.parallel, PARALLEL)}
    for name, (v, allowed) in choices.items():
        if v not in allowed:
            raise ConfigError(f"{name}={v!r} is not one of {', '.join(allowed)}{suggest(v, allowed)}")
    for r in t.report_to:
        if r not in REPORT_TO:
            raise ConfigError(f"training.report_to has {r!r}; choose among {', '.join(REPORT_TO)}{suggest(r, REPORT_TO)}")
    if t.eval_steps != 0 and ds.eval_source is None:
        from finetune.sft_data import DATASETS

        if ds.source not in DATASETS:  # a hub dataset has its own test split; a local file has no other split
            raise ConfigError(f"dataset.source={ds.source} is a local file and dataset.eval_source is not set, so "
                              f"evaluation would score the training data; set dataset.eval_source to a held-out "
                              f"file, or training.eval_steps=0 to train without evaluation")
    if tr.refactor_start is not None and tr.refactor_start < 0:
        raise ConfigError(f"trainer.refactor_start={tr.refactor_start} must be >= 0")
    if tr.name == "SpectralRefactorTrainer":
        from finetune.spectral import (
            check_args as check_refactor,  # pure argument checks; spectral.py needs torch
        )

        try:
            check_refactor(tr.refactor_mode, tr.refactor_lambda, tr.refactor_bound, tr.refactor_opt_state)
        except ValueError as e:
            raise ConfigError(f"trainer: {e}") from None
    lora_config(cfg)  # LoRAConfig's own checks (init names, alpha), as one line


def parse_override(arg: str) -> tuple[str, str, typing.Any]:
    """'training.learning_rate=3e-4' (or with a leading --) -> ('training', 'learning_rate', 3e-4)."""
    text = arg[2:] if arg.startswith("--") else arg
    if "=" not in text:
        raise ConfigError(f"cannot parse override {arg!r}; write section.key=value, e.g. training.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        where = section if section in SECTIONS else f"section '{section}'"
        hint = suggest(section, list(SECTIONS)) if section not in SECTIONS else ""
        raise ConfigError(f"override {arg!r} needs section.key with a known {where}{hint}; "
                          f"sections are {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Read a YAML config (None: defaults only), apply section.key=value overrides, check every key and type."""
    raw: typing.Any = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where} is not valid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)}), not a {type(raw).__name__}")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    parsed = [parse_override(arg) for arg in overrides]
    if path is not None:
        _from_config_folder(raw, path, {(section, name) for section, name, _ in parsed})
    for section, name, value in parsed:
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {}, **{name: value})
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{suggest(str(section), list(SECTIONS))}; "
                              f"sections are {', '.join(SECTIONS)}")
    cfg = FinetuneConfig(**{s: _build(s, raw.get(s)) for s in SECTIONS})
    _check(cfg)
    return cfg


# Paths a config file may name, and the local data files among them (sft_data.LOCAL_EXTENSIONS).
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("dataset", "source"), ("dataset", "eval_source"))
DATA_FILES = (".json", ".jsonl", ".parquet")


def _from_config_folder(raw: dict, path: str, overridden: set[tuple[str, str]]) -> None:
    """Relative paths written in a config file are read from the config's own folder, wherever the command
    runs (section.key=value overrides stay relative to the current folder, like any shell argument). A data
    file must exist there; a relative model or tokenizer path is taken from there when it exists there (else it
    stays as written: a hub id such as org/name). Keys an override sets are left alone."""
    folder = os.path.dirname(os.path.abspath(path))
    for section, key in (k for k in PATH_KEYS if k not in overridden):
        value = raw.get(section).get(key) if isinstance(raw.get(section), dict) else None
        if not isinstance(value, str) or not value or os.path.isabs(value) or value.startswith("~"):
            continue
        joined = os.path.normpath(os.path.join(folder, value))
        if section == "dataset" and value.endswith(DATA_FILES):
            if not os.path.isfile(joined):
                raise ConfigError(f"{section}.{key}={value} in {path} is read from the config's folder, where "
                                  f"{joined} does not exist; write it relative to the config's folder, or pass "
                                  f"{section}.{key}=PATH (relative to the current folder)")
            raw[section][key] = joined
        elif section == "model" and os.path.exists(joined):
            raw[section][key] = joined


def lora_config(cfg: FinetuneConfig):  # -> lora.LoRAConfig (imported lazily: lora.py needs torch)
    """The finetune/lora.py LoRAConfig of this run."""
    from finetune.lora import LoRAConfig

    lo = cfg.lora
    try:
        return LoRAConfig(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=tuple(lo.target_modules),
                          use_rslora=lo.use_rslora, init=lo.init)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def grad_accum_steps(cfg: FinetuneConfig, world_size: int) -> int:
    """Micro-steps per optimizer step per rank, from gradient_accumulation_steps or effective_batch_size."""
    t = cfg.training
    per_step = t.per_device_train_batch_size * world_size
    if t.effective_batch_size is None:
        return t.gradient_accumulation_steps or 1
    if t.effective_batch_size % per_step:
        raise ConfigError(f"training.effective_batch_size={t.effective_batch_size} is not a multiple of "
                          f"per_device_train_batch_size x world size = {t.per_device_train_batch_size} x {world_size}; "
                          f"change one of them")
    accum = t.effective_batch_size // per_step
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps != accum:
        raise ConfigError(f"training.gradient_accumulation_steps={t.gradient_accumulation_steps} disagrees with "
                          f"effective_batch_size={t.effective_batch_size} on {world_size} processes (needs {accum}); "
                          f"set only one of them")
    return accum


def total_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps when set, else epochs x steps_per_epoch."""
    t = cfg.training
    return t.max_steps if t.max_steps > 0 else t.num_train_epochs * steps_per_epoch


def interval_steps(value: float | int, total: int) -> int:
    """save_steps/eval_steps as a step count: a fraction (< 1) of total, rounded, at least 1; or the count."""
    if isinstance(value, float) and value < 1:
        return max(1, round(value * total))
    return int(value)


def warmup_steps(cfg: FinetuneConfig, total: int) -> int:
    """Linear warmup length: ceil(warmup_ratio x total), as Hugging Face's Trainer computes it."""
    return math.ceil(cfg.training.warmup_ratio * total)


def resolve_model_path(name: str) -> str:
    """A local Hugging Face folder (~ expanded); a hub id (org/name) downloaded with huggingface_hub (HF_TOKEN for gated)."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(f"model.name_or_path={name} is not a folder; give a Hugging Face model folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, gated, or no such repository
        raise ConfigError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); download it "
                          f"yourself (set HF_TOKEN for gated models) and set model.name_or_path to the folder") from None
