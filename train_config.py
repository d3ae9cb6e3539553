"""
How a pretraining run is trained: TrainConfig, the typed schema that train.py's config files and
--key=value overrides are checked against (configurator.py does the parsing). Model shapes live in
model.ModelConfig. Each field's comment is its one-line meaning.
This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "bfloat16", "float16", "float32")  # hardware.resolve_dtype: auto is bfloat16 where supported


def check_dtype(name: str) -> None:
    """A ValueError (one line) unless name is one of DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {', '.join(DTYPES)}")


@dataclass
class TrainConfig:
    """How a run is trained. Shapes of the model live in ModelConfig; block_size is shared by both."""

    # I/O and logging
    out_dir: str = "out"  # folder of the checkpoint (ckpt/) and the run logs
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
    wandb_log: bool = False  # also log to Weights & Biases
    wandb_project: str = "nanollm"  # the wandb project
    wandb_run_name: str = "run"  # the wandb run's name
    tensorboard_log: bool = False  # also write TensorBoard events (out_dir/tb)
    # batch
    batch_size: int = 12  # sequences per rank per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step summed over ranks (divided by world size)
    block_size: int = 1024  # training sequence length
    # optimizer and schedule
    learning_rate: float = 6e-4  # peak learning rate, reached at the end of warmup
    max_iters: int = 5000  # optimizer steps of the whole run
    weight_decay: float = 0.1  # AdamW decoupled weight decay (2-D weights only; norms and biases get none)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    decay_lr: bool = True  # False: constant learning_rate after warmup
    warmup_iters: int = 200  # steps of linear warmup from 0 to learning_rate
    lr_decay_iters: int | None = None  # end of the decay; None: max_iters
    min_lr: float = 6e-5  # the learning rate at the end of the decay
    lr_schedule: str = "cosine"  # 'cosine', or 'wsd' (warmup, stable at the peak, decay over the last lr_decay_fraction)
    lr_decay_fraction: float = 0.2  # wsd: the share of lr_decay_iters spent decaying to min_lr
    lr_decay_shape: str = "linear"  # wsd: 'linear' or '1-sqrt' (faster at first, slower near min_lr)
    optimizer: str = "adamw"  # 'adamw', or 'muon' (Muon for the blocks' 2-D weights, AdamW for the rest; optim.py)
    muon_lr_scale: float = 1.0  # the Muon group's lr = the schedule's lr times this
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations per step
    muon_adjust_lr: str = "match_rms_adamw"  # 'match_rms_adamw' (AdamW's lr transfers) or 'original' (lr ~0.02)
    max_nonfinite_steps: int = 5  # consecutive skipped (NaN/inf loss or gradient) steps before stopping
    # system
    device: str = "auto"  # 'auto' (cuda:LOCAL_RANK if a GPU is present, else cpu), 'cpu', 'cuda', 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on GPUs that support it, else float32), 'bfloat16', 'float16', 'float32'
    compile: bool = True  # torch.compile the model (slower start, faster steps)
    compile_mode: str = "model"  # 'model': one graph (around DDP); 'blocks': each Block + the loss apart (faster compile)
    fp8: str = ""  # '' (off), 'tensorwise' or 'rowwise': torchao float8 block linears (needs an sm_89+ GPU)
    fp8_emulate: bool = False  # run fp8 in emulation (CPU tests of the numerics; slow, not for training)
    use_zero1: bool = False  # shard AdamW state over data-parallel ranks
    use_fsdp: bool = False  # FSDP2: shard parameters, gradients and optimizer state
    use_cuda_graphs: bool = False  # capture the compiled step in CUDA graphs (GPU, static shapes)
    use_dataloader: bool = False  # read batches in DataLoader worker processes (pinned memory on GPU)
    dataloader_num_workers: int = 4  # worker processes with use_dataloader=True
    seed: int = 1337  # seed of the init, the batch order and dropout (dropout adds the rank)
    save_checkpoint: bool = True  # False: never write a checkpoint (benchmarks); eval and logs are unchanged
    # downstream tasks in the loop (evals.py): accuracy on multiple-choice / cloze tasks beside the val loss
    eval_tasks: str = ""  # comma-separated: a task name (evals.TASKS), NAME=PATH.jsonl or PATH.jsonl; '': none
    eval_tasks_interval: int = 0  # iterations between task evaluations (and at the end); 0: eval_interval
    eval_tasks_max_examples: int = 0  # score the first N examples of each task; 0: all

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
        for name in ("eval_tasks_interval", "eval_tasks_max_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

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
