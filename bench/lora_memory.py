"""
Peak GPU memory of a LoRA fine-tuning step against finetune/validate_config.py's estimate for the same YAML.

The step is finetune/train.py's, built by the same calls (finetune/build_lora.py): the base in bf16 (fp32 on
CPU) with fp32 adapters (the YAML's lora section), wrapped (activation checkpointing when
training.gradient_checkpointing is set) with the adapters' AdamW (training.adam_epsilon included), and
loop.py's own forward_backward and optimizer_step. The base is
random (a hub model cannot be downloaded on the GPU box) and every row is max_length tokens long, the
worst case the estimate describes. lora.init is set to gaussian: PiSSA gives the same shapes, and its
SVDs would take minutes at 8B.

    python bench/lora_memory.py finetune/configs/Llama-3.1/llama3.1_8b_metamath.yaml --preset 8b
    python bench/lora_memory.py CONFIG --preset 1b training.per_device_train_batch_size=8
    python bench/lora_memory.py CONFIG --preset smoke --device cpu     # seconds; what tests/test_bench.py runs

Prints one JSON line: the shape, tokens per micro-batch, gradient checkpointing, peak allocated and
reserved GiB after --steps steps (CUDA only), the estimate's total (with or without checkpointing, as
the YAML says) and measured / estimate.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import errors  # noqa: E402
import loop  # noqa: E402
import parallel  # noqa: E402
import runlog  # noqa: E402
from bench.lora_step import PRESETS  # noqa: E402
from finetune import build_lora  # noqa: E402
from finetune.config import ConfigError, load_config, lora_config  # noqa: E402
from finetune.memory import estimate_memory  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402


def main(argv: list[str]) -> int:
    return errors.run_command(lambda: run(argv))


class FixedBatch:
    """A loader whose every micro-batch is the same (x, y): the worst case of max_length rows."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.batch = (x, y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def run(argv: list[str]) -> int:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("config", help="a fine-tuning YAML (finetune/configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as finetune/train.py takes them")
    p.add_argument("--preset", default="8b", help=f"the base's shape: {', '.join(PRESETS)}")
    p.add_argument("--device", default="cuda", help="cuda or cpu (cpu: no GPU figures, the smoke test)")
    p.add_argument("--steps", type=int, default=3, help="training steps before the peak memory is read")
    a = p.parse_intermixed_args(argv)
    if a.preset not in PRESETS:
        raise ConfigError(f"--preset={a.preset} is not one of {', '.join(PRESETS)}")
    if a.steps < 1:
        raise ConfigError(f"--steps={a.steps} must be >= 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={a.device} but no CUDA device is visible; use --device cpu")
    cfg = load_config(a.config, [*a.overrides, "lora.init=gaussian", f"training.device={a.device}"])
    t = cfg.training
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if t.bf16 and cuda else torch.float32
    B, T = t.per_device_train_batch_size, cfg.dataset.max_length
    mc = ModelConfig(block_size=T, **PRESETS[a.preset])

    # finetune/train.py's build (build_lora), from a random base instead of hf_checkpoint.from_hf
    with torch.device("meta"):
        base = GPT(mc)
    base.to(dtype).to_empty(device=device)
    base.init_weights()
    torch.manual_seed(t.seed)
    model = build_lora.lora_model(base, lora_config(cfg), t.seed)
    d = parallel.Dist(rank=0, local_rank=0, world_size=1, device=device)
    train_model, optimizer = build_lora.wrap_and_optimizer(
        model, d, parallel.layout(d, zero1=False, fsdp=False), dtype, gradient_checkpointing=t.gradient_checkpointing,
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon)
    autocast, _ = loop.precision(dtype, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device)
    steps = loop.Loop(d, model, train_model, optimizer, FixedBatch(x, y), runlog.RunLog("", False, {}), accum=1,
                      max_iters=a.steps, lr_at=lambda it: t.learning_rate, evaluate_and_save=lambda run, done: None,
                      save=lambda run: None, grad_clip=t.max_grad_norm, autocast=autocast)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = loop.RunState()
    losses = [loop.train_step(steps, run).loss.item() for _ in range(a.steps)]
    est = estimate_memory(mc, cfg, world_size=1, on_gpu=cuda)
    estimate = est["total_checkpointed" if t.gradient_checkpointing else "total"]
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if cuda else None
    print(json.dumps({
        "config": a.config, "preset": a.preset, "architecture": mc.arch_string, "n_params": model.num_params(),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "batch_size": B, "max_length": T, "tokens_per_micro_batch": B * T,
        "gradient_checkpointing": t.gradient_checkpointing, "r": cfg.lora.r, "losses": losses,
        "peak_allocated_gib": peak,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 1024**3 if cuda else None,
        "estimate_gib": estimate, "estimate_parts_gib": {k: v for k, v in est.items() if not k.startswith(("n_", "tok"))},
        "measured_over_estimate": peak / estimate if cuda else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
