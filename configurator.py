"""
What the user typed: typed configs from nanoGPT-style config files and --key=value overrides, the
pretraining config (TrainConfig), argparse for the other commands, and the one-line user error.

    python train.py config/full_llama3_1.5b_optimal.py --batch_size=8 --compile=True

A config file is Python assignments. It runs in a private namespace (never the caller's globals),
and its public names, then the overrides, are checked against the fields of the given dataclasses:
an unknown key is rejected with the closest known key, a value of the wrong type is rejected with
the expected type. A key that several dataclasses share (e.g. block_size) is given to each.

Every mistake a user can make raises a subclass of UserError; run_command turns one into a single
`error:` line and exit status 2, never a traceback. Anything else is a bug and keeps its traceback.
This module imports no torch, so light commands (plots, data preparation) stay light.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import math
import os
import runpy
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields

# Flags of the original training guide that are spelled differently now.
LEGACY_KEYS = {"flash_attn"}


DTYPES = ("auto", "bfloat16", "float16", "float32")  # hardware.resolve_dtype: auto is bfloat16 where supported


def check_dtype(name: str) -> None:
    """A ValueError (one line) unless name is one of DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")


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
    overwrite_out_dir: bool = False  # let a new run (scratch or HF) delete the checkpoint out_dir holds
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
    lr_decay_iters: int | None = None  # end of the decay; None: max_iters
    min_lr: float = 6e-5
    lr_schedule: str = "cosine"  # 'cosine', or 'wsd' (warmup, stable at the peak, decay over the last lr_decay_fraction)
    lr_decay_fraction: float = 0.2  # wsd: the share of lr_decay_iters spent decaying to min_lr
    lr_decay_shape: str = "linear"  # wsd: 'linear' or '1-sqrt' (faster at first, slower near min_lr)
    optimizer: str = "adamw"  # 'adamw', or 'muon' (Muon for the blocks' 2-D weights, AdamW for the rest; optim.py)
    muon_lr_scale: float = 1.0  # the Muon group's lr = the schedule's lr times this
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5  # Newton-Schulz iterations per step
    muon_adjust_lr: str = "match_rms_adamw"  # 'match_rms_adamw' (AdamW's lr transfers) or 'original' (lr ~0.02)
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
        self._check_optimizer()
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        check_dtype(self.dtype)
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

    def _check_optimizer(self) -> None:
        """The optimizer and schedule keys (optim.OPTIMIZERS, optim.ADJUST_LR, loop.get_lr's schedules)."""
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r} is not one of adamw, muon")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not one of cosine, wsd")
        if not 0 < self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction={self.lr_decay_fraction} must be in (0, 1]")
        if self.lr_decay_shape not in ("linear", "1-sqrt"):
            raise ValueError(f"lr_decay_shape={self.lr_decay_shape!r} is not one of linear, 1-sqrt")
        if self.muon_adjust_lr not in ("match_rms_adamw", "original"):
            raise ValueError(f"muon_adjust_lr={self.muon_adjust_lr!r} is not one of match_rms_adamw, original")
        if self.muon_lr_scale <= 0:
            raise ValueError(f"muon_lr_scale={self.muon_lr_scale} must be > 0")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum={self.muon_momentum} must be in [0, 1)")
        if not 1 <= self.muon_ns_steps <= 20:
            raise ValueError(f"muon_ns_steps={self.muon_ns_steps} must be between 1 and 20")
        if self.optimizer == "muon" and self.use_cuda_graphs:
            raise ValueError("optimizer=muon with use_cuda_graphs=True is untested (no GPU here to prove it); "
                             "drop use_cuda_graphs, or use optimizer=adamw")


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a size); the message is one line naming the fix."""


class ConfigError(UserError):
    """Bad configuration: the message is one line naming the key and the fix."""


def run_command(body: Callable[[], int], cleanup: Callable[[], None] | None = None) -> int:
    """Run a command's body: a UserError or an OSError is one `error:` line on stderr and exit status 2,
    never a traceback; cleanup (e.g. leaving the process group) runs either way."""
    try:
        return body()
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands without a training loop (that one saves, then returns 130 itself)
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no (a missing file, permissions, a full disk): not a bug to trace
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    finally:
        if cleanup is not None:
            cleanup()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a ConfigError (one `error:` line under run_command, no usage dump).

    --help prints the description as written, examples included.
    """

    def __init__(self, prog: str | None = None, description: str | None = None, **kwargs: typing.Any) -> None:
        super().__init__(prog=prog, description=description and description.strip(),
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)




def read_config_file(path: str) -> dict:
    """Run a config file in a fresh namespace and return its public assignments."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        namespace = runpy.run_path(path, init_globals={})
    except Exception as e:
        raise ConfigError(f"could not execute config file {path}: {type(e).__name__}: {e}") from e
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType | types.FunctionType | type)
    }


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr=3e-4', ...] -> {'lr': '3e-4'}; values stay strings until their field's type is known."""
    out: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot parse argument {arg!r}; overrides are written --key=value")
        key, value = arg[2:].split("=", 1)
        out[key] = value
    return out


def _field_types(schemas: list[type]) -> dict[str, list[tuple[type, typing.Any]]]:
    """key -> [(schema, annotated type)] for every field of every schema."""
    out: dict[str, list[tuple[type, typing.Any]]] = {}
    for schema in schemas:
        hints = typing.get_type_hints(schema)
        for f in fields(schema):
            out.setdefault(f.name, []).append((schema, hints[f.name]))
    return out


def coerce(key: str, value: typing.Any, annotation: typing.Any) -> typing.Any:
    """Convert value (a CLI string or a config-file object) to the annotated type, or raise ConfigError."""
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value in ("None", "none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    if annotation is bool:  # True or False only: `--compile=yes` or `=1` is a typo as likely as a wish
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r} is not a boolean; use True or False")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, float) and parsed.is_integer():
                parsed = int(parsed)  # allows 1e6 for counts
            if isinstance(parsed, int) and not isinstance(parsed, bool):
                return parsed
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is not an integer")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
        else:
            raise ConfigError(f"{key}={value!r} is not a number")
        if not math.isfinite(result):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return result
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is not a string")
    raise AssertionError(f"unsupported annotation {annotation} for {key}")


def suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve(values: dict[str, typing.Any], schemas: list[type]) -> list[typing.Any]:
    """Route flat key/values to instances of each schema, with type checks and legacy keys.

    Returns one instance per schema, in order; each schema's own __post_init__ checks its values.
    """
    types_by_key = _field_types(schemas)
    values = dict(values)
    if "flash_attn" in values:
        # The training guide's --flash_attn=True means attention_backend=flash_attn_2.
        use_flash = coerce("flash_attn", values.pop("flash_attn"), bool)
        if use_flash:
            values["attention_backend"] = "flash_attn_2"
        elif values.get("attention_backend", "flash_attn_2") == "flash_attn_2":
            values["attention_backend"] = "sdpa"
    kwargs: list[dict[str, typing.Any]] = [{} for _ in schemas]
    for key, value in values.items():
        if key not in types_by_key:
            raise ConfigError(
                f"unknown config key '{key}'{suggest(key, list(types_by_key) + list(LEGACY_KEYS))}"
            )
        for schema, annotation in types_by_key[key]:
            kwargs[schemas.index(schema)][key] = coerce(key, value, annotation)
    out = []
    for schema, kw in zip(schemas, kwargs):
        try:
            out.append(schema(**kw))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return out


def load(args: list[str], schemas: list[type]) -> tuple[list[typing.Any], set[str]]:
    """Parse `[CONFIG.py] [--key=value ...]` into schema instances.

    Returns (instances, explicit keys): the keys set by the file or the command line, as opposed
    to defaults, so callers can tell "n_layer=12 because the user said so" from a default.
    """
    config_path = None
    if args and not args[0].startswith("--"):
        config_path, args = args[0], args[1:]
    values = read_config_file(config_path) if config_path else {}
    values.update(parse_overrides(args))
    explicit = set(values) - LEGACY_KEYS
    if "flash_attn" in values:
        explicit.add("attention_backend")
    return resolve(values, schemas), explicit


def load_train(args: list[str]) -> tuple[TrainConfig, typing.Any, set[str]]:
    """`[CONFIG.py] [--key=value ...]` of train.py as (TrainConfig, model.ModelConfig, explicitly set keys)."""
    from model import ModelConfig  # torch: only for the commands that build a model

    (train_cfg, model_cfg), explicit = load(args, [TrainConfig, ModelConfig])
    return train_cfg, model_cfg, explicit


def check_input_dir(path: str, flag: str, needs: tuple[str, ...] = ()) -> str:
    """path, ~ expanded, if it is a folder holding every file of needs; else a ConfigError naming flag."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is not a folder")
    missing = [f for f in needs if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ConfigError(f"{flag}={path} has no {missing[0]}; pass a folder that holds {', '.join(needs)}")
    return path


def check_output_dir(path: str, flag: str = "out_dir") -> None:
    """Create the folder path if needed and prove it writable, or a ConfigError naming it: before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a file, not a folder; choose another --{flag}")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--{flag}={path} cannot be written ({e.strerror or type(e).__name__}); choose a "
                          f"writable --{flag}") from None
