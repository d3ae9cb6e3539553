"""
Export a train.py checkpoint to a Hugging Face folder that transformers loads as is.

    python export_hf.py --out_dir=out-llama3-1.5b-optimal --hf_dir=exports/llama3-1.5b [--dtype=bfloat16]

The folder holds config.json and model.safetensors (sharded above 5 GB); load it with
transformers.AutoModelForCausalLM.from_pretrained(hf_dir). Tokenizer files are not written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

import checkpoint
import configurator
import errors
import hf_checkpoint


@dataclass
class ExportConfig:
    out_dir: str = "out"  # where train.py wrote ckpt/
    hf_dir: str = ""  # the folder to write
    dtype: str = "float32"  # float32, bfloat16 or float16

    def __post_init__(self) -> None:
        if not self.hf_dir:
            raise ValueError("pass --hf_dir=PATH, the Hugging Face folder to write")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")


def main(argv: list[str]) -> int:
    return errors.run_command(lambda: export(argv))


def export(argv: list[str]) -> int:
    (cfg,), _ = configurator.load(argv, [ExportConfig], __doc__)
    configurator.check_output_dir(cfg.hf_dir, "hf_dir")
    path, state = checkpoint.latest(cfg.out_dir)
    model = checkpoint.load_model(path)
    hf_checkpoint.to_hf(model, cfg.hf_dir, dtype=getattr(torch, cfg.dtype))
    print(f"wrote {cfg.hf_dir} ({hf_checkpoint.hf_architecture(model.config)}, iter {state['iter_num']}, {cfg.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
