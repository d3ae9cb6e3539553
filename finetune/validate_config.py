"""
Check a fine-tuning YAML without a GPU, estimate its memory per GPU, and evaluate a checkpoint.

    cd finetune
    python validate_config.py --config configs/Llama-3.1/llama3.1_8b_metamath.yaml --model_config ../config/llama3.1_8b.py
    python validate_config.py --config configs/smollm2/smollm2_math_cpu.yaml --checkpoint outputs/smollm2_math_cpu/checkpoint-best

Checks, each failure one `error:` line: every key known and typed (config.py's load_config, with the
closest name suggested); the base model's shape (its config.json, or --model_config for a hub id that
is not downloaded: a config.json or one of ../config/*.py) against the LoRA targets and rank and
dataset.max_length; the dataset found (a local file read and counted; gsm8k/metamathqa are hub
datasets fetched at train time); the effective batch against --world_size.

The memory estimate per GPU (GiB) is finetune/memory.py's: the frozen base, the fp32 adapters with
their gradients and AdamW moments, the fused loss's buffers, and the activations of one micro-batch,
with and without activation checkpointing. --checkpoint DIR evaluates DIR's adapter (base + adapter_config.json +
adapter_model.safetensors) on the test split: eval/loss, eval/token_accuracy, eval/answer_accuracy.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import configurator  # noqa: E402
import errors  # noqa: E402
import families  # noqa: E402
import hf_checkpoint  # noqa: E402
from finetune.config import (  # noqa: E402
    ConfigError,
    FinetuneConfig,
    grad_accum_steps,
    keys_epilog,
    load_config,
    resolve_model_path,
)
from finetune.memory import estimate_memory, memory_lines, projections  # noqa: E402


def model_shape(cfg: FinetuneConfig, model_config: str | None):
    """The base's ModelConfig from --model_config (config.json, its folder, or ../config/*.py) or the
    local model folder; None when the base is a hub id that is not on disk."""
    path = model_config or os.path.expanduser(cfg.model.name_or_path)
    if model_config and model_config.endswith(".py"):
        if not os.path.isfile(model_config):
            raise ConfigError(f"--model_config={model_config} not found")
        _, mc, _ = configurator.load_train([model_config])
        return mc
    if os.path.isfile(path) and path.endswith(".json"):
        with open(path) as f:
            return hf_checkpoint.hf_to_config(json.load(f))
    if os.path.isdir(path):
        return hf_checkpoint.hf_to_config(hf_checkpoint.read_config(path))
    if model_config:
        raise ConfigError(f"--model_config={model_config} is not a config.json, a model folder or a config/*.py file")
    return None


def check_shapes(cfg: FinetuneConfig, mc) -> list[str]:
    """ConfigError when the LoRA section or max_length cannot fit the base; notes otherwise."""
    lo, proj = cfg.lora, projections(mc)
    missing = [t for t in lo.target_modules if t not in proj]
    if missing:
        raise ConfigError(f"lora.target_modules has {missing[0]}, which this base ({mc.mlp} MLP) does not have; "
                          f"choose among {', '.join(proj)}")
    smallest = min(min(proj[t]) for t in lo.target_modules)
    if lo.r > smallest:
        raise ConfigError(f"lora.r={lo.r} exceeds the smallest adapted dimension {smallest}; lower lora.r")
    if cfg.dataset.max_length > mc.block_size:
        raise ConfigError(f"dataset.max_length={cfg.dataset.max_length} exceeds the base's context of "
                          f"{mc.block_size} tokens; lower dataset.max_length")
    family = families.family_for(mc)
    if any(family.layout.peft_module(t) is None for t in lo.target_modules):
        separate = ", ".join(f.title for f in families.FAMILIES.values() if f.layout.peft_module("q_proj"))
        raise ConfigError(f"a {family.title} base fuses its projections ({family.architecture}), so its adapters "
                          f"cannot be written in PEFT's format that every checkpoint holds; fine-tune a {separate} base")
    return [f"shape: {mc.arch_string}, vocab {mc.vocab_size}, context {mc.block_size}; r={lo.r} fits "
            f"{len(lo.target_modules)} target projections"]


def check_dataset(cfg: FinetuneConfig) -> list[str]:
    """Local files read and counted (DataError when unreadable); hub datasets noted."""
    from finetune.sft_data import DATASETS, load_examples

    ds, notes = cfg.dataset, []
    for role, (source, split, fields) in (("train", (ds.source, ds.split, ds.fields)), ("eval", ds.eval_data())):
        if source in DATASETS:
            notes.append(f"{role} data: {source} ({split}) from the Hugging Face hub ({DATASETS[source]['hub'][0]}), "
                         f"downloaded at train time")
            continue
        n = len(load_examples(source, split, fields=fields, template=ds.template))
        notes.append(f"{role} data: {source}, {n:,} examples")
    return notes


def evaluate_checkpoint(cfg: FinetuneConfig, checkpoint: str | None, device: str) -> dict[str, float]:
    """Test-split metrics of the base + checkpoint's adapter (the base alone when checkpoint is None),
    through the evaluation fine-tuning runs (sft_eval.evaluate)."""
    import torch

    import loop
    import parallel
    from finetune.lora import load_adapted
    from finetune.sft_data import DATASETS, eval_batches, load_examples, tokenize_examples
    from finetune.sft_eval import evaluate

    ds, t = cfg.dataset, cfg.training
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = cfg.model.tokenizer or path
    template = ds.template or (DATASETS[ds.source]["template"] if ds.source in DATASETS else None)
    source, split, fields = ds.eval_data()
    examples = load_examples(source, split, fields=fields, limit=ds.max_eval_samples, template=template)
    d = parallel.Dist(0, 0, 1, parallel.resolve_device(device))
    dtype = torch.bfloat16 if t.bf16 and d.device.type == "cuda" else torch.float32
    model = load_adapted(path, checkpoint).to(device=d.device, dtype=dtype)
    batches = eval_batches(tokenize_examples(examples, tokenizer, ds.max_length), t.per_device_eval_batch_size,
                           0, 1, d.device)
    answer_ex = [e for e in examples if e["answer"] is not None][:ds.answer_eval_samples]
    autocast, _ = loop.precision(dtype, d.device)
    metrics = evaluate(model, batches, answer_ex, tokenizer, max_new_tokens=ds.max_new_tokens,
                       batch_size=t.per_device_eval_batch_size, autocast=autocast, d=d, progress=True)
    return metrics | {"examples": len(examples)}


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(prog="validate_config.py", description="Check a fine-tuning YAML; estimate memory; evaluate.",
                                   epilog=keys_epilog())
    parser.add_argument("--config", required=True, help="a YAML config (configs/...)")
    parser.add_argument("--model_config", default=None,
                        help="the base's shape when model.name_or_path is a hub id not on disk: a config.json, "
                             "a model folder or ../config/*.py")
    parser.add_argument("--world_size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="GPUs the run will use (the effective batch and the sharding depend on it)")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint-N folder (or any PEFT adapter folder) "
                                                           "to evaluate on the test split")
    parser.add_argument("--base", action="store_true", help="evaluate the base model alone on the test split")
    parser.add_argument("--device", default="auto", help="for --checkpoint/--base: auto | cpu | cuda")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")

    def body() -> int:
        args, overrides = parser.parse_known_args(argv)
        bad = [a for a in overrides if a.startswith("--") and "." not in a.split("=", 1)[0]]
        if bad:
            raise ConfigError(f"unknown flag {bad[0]}; config values are written section.key=value")
        if args.world_size < 1:
            raise ConfigError(f"--world_size={args.world_size} must be >= 1")
        if args.checkpoint is not None:  # an output_dir or one of its checkpoint-N folders
            args.checkpoint = configurator.check_input_dir(args.checkpoint, "--checkpoint", ("adapter_config.json",))
        cfg = load_config(args.config, overrides)
        accum = grad_accum_steps(cfg, args.world_size)
        lines = [f"config {args.config}: every key known and typed; {cfg.training.per_device_train_batch_size} per "
                 f"GPU x {accum} accumulation x {args.world_size} GPU(s) per optimizer step"]
        mc = model_shape(cfg, args.model_config)
        result: dict = {"config": args.config, "grad_accum": accum}
        if mc is None:
            lines.append(f"shape: {cfg.model.name_or_path} is not on disk; pass --model_config (its config.json "
                         f"or ../config/*.py) to check shapes and estimate memory")
        else:
            lines += check_shapes(cfg, mc)
        lines += check_dataset(cfg)
        if mc is not None:
            memory = estimate_memory(mc, cfg, args.world_size, on_gpu=cfg.training.device != "cpu")
            lines += memory_lines(memory, cfg, args.world_size)
            result["memory_gib"] = memory
        print("\n".join(lines), flush=True)
        if args.checkpoint is not None or args.base:
            metrics = evaluate_checkpoint(cfg, args.checkpoint, args.device)
            print(f"test metrics of {args.checkpoint or 'the base model'} on {metrics['examples']} examples: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples"))
            result["metrics"] = metrics
        if args.json:
            print(json.dumps(result))
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
