"""
Fold a LoRA adapter into its base model and write a plain Hugging Face folder.

    cd finetune
    python merge_adapter.py --base_model BASE_DIR --adapter_path OUT/checkpoint-best --output_path OUT/merged

The base is a Hugging Face folder (hf_checkpoint.from_hf); the adapter a PEFT-format folder (adapter_config.json +
adapter_model.safetensors: what finetune/train.py writes into every checkpoint-N, or what peft's
save_pretrained writes). The merge runs in fp32 (W_i + scaling * B_i A_i per projection slice), then the
folder is written in the base's dtype (or --dtype) through hf_checkpoint.to_hf, the base's tokenizer files copied in,
and renamed into place: an interrupted merge never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import atomic  # noqa: E402
import configurator  # noqa: E402
import errors  # noqa: E402
import hf_checkpoint  # noqa: E402
from errors import ConfigError  # noqa: E402
from finetune.lora import load_adapted, merge_lora  # noqa: E402
from finetune.sft_data import TEMPLATE_FILE  # noqa: E402

# what a Hugging Face tokenizer folder may hold besides the model's config and weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(path: str) -> torch.dtype:
    """The dtype the base folder's config.json declares (float32 when it says nothing)."""
    config = hf_checkpoint.read_config(path)
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name) or torch.float32


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of src into dst; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def merge(base_model: str, adapter_path: str, output_path: str, dtype: torch.dtype | None = None) -> list[str]:
    """Merge adapter_path into base_model in fp32 and write output_path atomically; returns the tokenizer files copied."""
    model = merge_lora(load_adapted(base_model, adapter_path))
    with atomic.temp_dir(output_path, prefix=".tmp-merge-") as tmp:
        folder = os.path.join(tmp, "model")
        hf_checkpoint.to_hf(model, folder, dtype or base_dtype(base_model))
        copied = copy_tokenizer(base_model, folder)
        if os.path.isfile(os.path.join(adapter_path, TEMPLATE_FILE)):  # the prompt format, for inference.py
            shutil.copy2(os.path.join(adapter_path, TEMPLATE_FILE), os.path.join(folder, TEMPLATE_FILE))
        atomic.replace_dir(folder, os.path.abspath(output_path))
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(prog="merge_adapter.py",
                                         description="Merge a PEFT-format LoRA adapter into its base model.")
    parser.add_argument("--base_model", required=True, help="the base model's Hugging Face folder")
    parser.add_argument("--adapter_path", required=True, help="an adapter folder (adapter_config.json + "
                                                              "adapter_model.safetensors), e.g. OUT/checkpoint-best")
    parser.add_argument("--output_path", required=True, help="the merged Hugging Face folder to write")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: the base folder's dtype")

    def body() -> int:
        args = parser.parse_args(argv)
        base = configurator.check_input_dir(args.base_model, "--base_model", ("config.json",))
        adapter = configurator.check_input_dir(args.adapter_path, "--adapter_path",
                                               ("adapter_config.json", "adapter_model.safetensors"))
        out = os.path.abspath(os.path.expanduser(args.output_path))
        if out in (os.path.abspath(base), os.path.abspath(adapter)):
            raise ConfigError(f"--output_path={out} is an input folder; write the merged model elsewhere")
        copied = merge(base, adapter, out, DTYPES[args.dtype])
        print(f"wrote the merged model {out}: the base {base} with the adapter {adapter} folded in "
              f"(tokenizer files copied: {', '.join(copied) or 'none found'})")
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
