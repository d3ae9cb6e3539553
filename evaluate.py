"""
Score a checkpoint or a Hugging Face folder on downstream tasks (evals.py): per-task accuracy and the
CORE-style centered aggregate.

    python evaluate.py --checkpoint=out-shakespeare-char --tasks=shakespeare_line_end
    python evaluate.py --checkpoint=exports/smollm2 --tasks=hellaswag,arc_easy,piqa --max_examples=500
    python evaluate.py --checkpoint=out --tasks=hellaswag=hellaswag_val.jsonl,my_task.jsonl --out=scores.json

--checkpoint: a train.py out_dir (its ckpt/), a checkpoint folder, or a Hugging Face folder (config.json,
safetensors and tokenizer.json). --tasks: names (evals.TASKS, read from the hub with `datasets`),
NAME=PATH.jsonl (the same published fields from a local file), or PATH.jsonl in our own fields.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

import atomic
import configurator
import errors
import evals
import hardware
import loop
import parallel
from train_config import check_dtype


@dataclass
class EvalConfig:
    checkpoint: str = ""  # a train.py out_dir, a checkpoint folder or a Hugging Face folder
    tasks: str = ""  # comma-separated: NAME, NAME=PATH.jsonl or PATH.jsonl
    max_examples: int = 0  # the first N examples of each task; 0: all
    tokenizer: str = ""  # a Hugging Face folder whose tokenizer.json to use instead of the model's own
    batch_tokens: int = 8192  # padded tokens per forward
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N'
    dtype: str = "float32"  # 'auto' (bfloat16 where supported), 'bfloat16', 'float16', 'float32'
    out: str = ""  # also write the results as JSON here

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("pass --checkpoint=PATH: a train.py out_dir, a checkpoint or a Hugging Face folder")
        if not evals.parse_task_list(self.tasks):
            raise ValueError(f"pass --tasks=NAME[,...]: one of {', '.join(evals.TASKS)}, NAME=PATH.jsonl or PATH.jsonl")
        for name in ("max_examples", "batch_tokens"):
            if getattr(self, name) < 0 or (name == "batch_tokens" and self.batch_tokens == 0):
                raise ValueError(f"{name}={getattr(self, name)} must be {'>= 0' if name == 'max_examples' else '> 0'}")
        check_dtype(self.dtype)


def run(argv: list[str]) -> int:
    (cfg,), _ = configurator.load(argv, [EvalConfig], __doc__)
    tasks = evals.load_tasks(evals.parse_task_list(cfg.tasks), cfg.max_examples or None)  # bad input: before loading
    d = loop.start(cfg.device)
    model, enc, what = evals.load_model(cfg.checkpoint, cfg.tokenizer or None)
    model.to(d.device)
    autocast, _ = loop.precision(hardware.resolve_dtype(cfg.dtype, d.device), d.device)
    loop.print0(d, f"evaluating {what} ({model.config.arch_string}) on {len(tasks)} task(s), "
                   f"{sum(len(t.examples) for t in tasks):,} examples, {d.world_size} x {d.device.type}")
    results = evals.evaluate(model, enc, tasks, batch_tokens=cfg.batch_tokens, autocast=autocast, rank=d.rank,
                             world_size=d.world_size, device=d.device)
    loop.print0(d, evals.summary(results))
    if d.is_master:
        print(json.dumps(results))
        if cfg.out:
            atomic.write_json(cfg.out, {"checkpoint": cfg.checkpoint, **results})
    parallel.barrier(d)
    return 0


def main(argv: list[str]) -> int:
    with torch.no_grad():  # scoring only; a context, so an in-process caller keeps its own grad mode
        return errors.run_command(lambda: run(argv), cleanup=loop.finish)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
