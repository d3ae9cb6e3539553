"""
Train a GPT-2, LLaMA-2, LLaMA-3 or Qwen3 model.

    python train.py config/full_llama3_1.5b_optimal.py --max_iters=10 --compile=False

Every default sits in TrainConfig (the training loop) or model.ModelConfig (the architecture);
a config file and --key=value overrides are checked against both.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

import configurator
from model import GPT, ModelConfig


@dataclass
class TrainConfig:
    """How a run is trained. Shapes of the model live in ModelConfig; block_size is shared by both."""

    # I/O and logging
    out_dir: str = "out"
    dataset: str = "shakespeare_char"  # folder under data/ holding train.bin, val.bin, meta.json
    eval_interval: int = 250  # iterations between evaluations (and checkpoint saves)
    eval_iters: int = 20  # fixed validation batches per evaluation
    log_interval: int = 10  # iterations between log lines (the only host syncs of the loop)
    gradient_log_interval: int = 0  # iterations between per-layer gradient-norm records; 0: never
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume', or a Hugging Face model folder
    eval_only: bool = False  # evaluate once and exit, changing no checkpoint
    dry_run: bool = False  # print the model, FLOPs and a memory estimate without reading data
    wandb_log: bool = False
    wandb_project: str = "nanollm"
    wandb_run_name: str = "run"
    tensorboard_log: bool = False
    # batch
    batch_size: int = 12  # sequences per rank per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, over all ranks
    block_size: int = 1024  # sequence length
    # optimizer and schedule
    learning_rate: float = 6e-4
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    decay_lr: bool = True
    warmup_iters: int = 200
    lr_decay_iters: int | None = None  # None: max_iters
    min_lr: float = 6e-5
    max_nonfinite_steps: int = 5  # consecutive skipped steps (NaN/inf loss or grad) before stopping
    # system
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'
    dtype: str = (
        "auto"  # 'auto' (bfloat16 on GPUs that have it, else float32), 'bfloat16', 'float16', 'float32'
    )
    compile: bool = True
    use_zero1: bool = False
    use_fsdp: bool = False
    use_cuda_graphs: bool = False
    use_dataloader: bool = False
    dataloader_num_workers: int = 4
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in (
            "eval_interval",
            "eval_iters",
            "log_interval",
            "batch_size",
            "gradient_accumulation_steps",
            "block_size",
            "max_iters",
            "max_nonfinite_steps",
        ):
            value = getattr(self, name)
            if value <= 0:
                raise ValueError(f"{name}={value} must be > 0")
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
            raise ValueError(
                "use_zero1 and use_fsdp are mutually exclusive: FSDP already shards optimizer state"
            )


def parse_config(argv: list[str]) -> tuple[TrainConfig, ModelConfig]:
    """Resolve `[CONFIG.py] [--key=value ...]` into the two typed configs."""
    (train_cfg, model_cfg), _ = configurator.load(argv, [TrainConfig, ModelConfig])
    return train_cfg, model_cfg


def model_summary(model: GPT, seq_len: int) -> dict:
    c = model.config
    return {
        "architecture": c.arch_string,
        "n_params": model.num_params(),
        "n_params_non_embedding": model.num_params(non_embedding=True),
        "flops_per_token": model.flops_per_token(seq_len),
    }


def main(argv: list[str]) -> int:
    try:
        train_cfg, model_cfg = parse_config(argv)
    except configurator.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = GPT(model_cfg)
    summary = model_summary(model, train_cfg.block_size)
    print(f"architecture: {summary['architecture']}")
    print(f"parameters: {summary['n_params']:,} ({summary['n_params_non_embedding']:,} non-embedding)")
    print(f"FLOPs per token (fwd+bwd, seq {train_cfg.block_size}): {summary['flops_per_token']:.4g}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
