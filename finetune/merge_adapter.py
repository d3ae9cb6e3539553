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

import argparse
import os
import shutil
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
# the repository root first (`import train` is the shared loop, never finetune/train.py); finetune/ after it
sys.path[:] = [ROOT] + [p for p in sys.path if p != ROOT]
if _HERE not in sys.path:
    sys.path.append(_HERE)

import torch  # noqa: E402

import hf_checkpoint  # noqa: E402
from model import GPT  # noqa: E402

# what a Hugging Face tokenizer folder may hold besides the model's config and weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(ValueError):
    """Bad paths or flags: printed as one `error:` line."""


def check_folder(path: str, flag: str, needs: tuple[str, ...]) -> str:
    """path, ~ expanded, if it is a folder holding every file of needs; else a CommandError naming flag."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise CommandError(f"{flag}={path} is not a folder")
    missing = [f for f in needs if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise CommandError(f"{flag}={path} has no {missing[0]}; pass a folder that holds {', '.join(needs)}")
    return path


def base_dtype(path: str) -> torch.dtype:
    """The dtype the base folder's config.json declares (float32 when it says nothing)."""
    config = hf_checkpoint.read_config(path)
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name) or torch.float32


def load_adapted(base_model: str, adapter_path: str | None) -> GPT:
    """The base in fp32 with the adapter applied (lora.load_peft_adapter), or the base alone."""
    from lora import load_peft_adapter

    model = hf_checkpoint.from_hf(base_model, dtype=torch.float32)
    if adapter_path is not None:
        load_peft_adapter(model, adapter_path)
    return model.eval()


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
    from lora import merge_lora

    model = merge_lora(load_adapted(base_model, adapter_path))
    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-merge-", dir=parent)
    try:
        folder = os.path.join(tmp, "model")
        hf_checkpoint.to_hf(model, folder, dtype or base_dtype(base_model))
        copied = copy_tokenizer(base_model, folder)
        hf_checkpoint._replace_dir(folder, os.path.abspath(output_path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return copied


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise CommandError(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="merge_adapter.py", description="Merge a PEFT-format LoRA adapter into its base model.")
    parser.add_argument("--base_model", required=True, help="the base model's Hugging Face folder")
    parser.add_argument("--adapter_path", required=True, help="an adapter folder (adapter_config.json + "
                                                              "adapter_model.safetensors), e.g. OUT/checkpoint-best")
    parser.add_argument("--output_path", required=True, help="the merged Hugging Face folder to write")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="auto: the base folder's dtype")
    try:
        args = parser.parse_args(argv)
        base = check_folder(args.base_model, "--base_model", ("config.json",))
        adapter = check_folder(args.adapter_path, "--adapter_path", ("adapter_config.json", "adapter_model.safetensors"))
        out = os.path.abspath(os.path.expanduser(args.output_path))
        if out in (os.path.abspath(base), os.path.abspath(adapter)):
            raise CommandError(f"--output_path={out} is an input folder; write the merged model elsewhere")
        copied = merge(base, adapter, out, DTYPES[args.dtype])
    except (ValueError, OSError) as e:  # CommandError, HFCheckpointError, load_peft_adapter's ValueError
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"merged {adapter} into {base}: wrote {out} (tokenizer files: {', '.join(copied) or 'none found'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
