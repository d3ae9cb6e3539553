"""
Generate text from a trained checkpoint (or a Hugging Face folder) with the tokenizer its data used.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2 --max_new_tokens=300
    python sample.py --init_from=/path/to/hf_folder --tokenizer=llama3 --start="The capital of France"
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

import checkpoint
import configurator
import errors
import hardware
import hf_checkpoint
import parallel
import tokenizer as tokenizers
import train_config
from generation import generate
from model import GPT


@dataclass
class SampleConfig:
    out_dir: str = "out"  # where train.py wrote ckpt/
    init_from: str = "resume"  # 'resume' (out_dir/ckpt) or a Hugging Face model folder
    tokenizer: str | None = None  # gpt2, llama2, llama3, qwen3: needed with a Hugging Face folder
    tokenizer_path: str | None = None  # a tokenizer file or folder in place of the named one
    start: str = "\n"  # prompt text, or FILE:path to read it from a file
    num_samples: int = 3  # samples to draw
    max_new_tokens: int = 300  # tokens generated per sample
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200  # sample from the k most likely tokens; None: all
    seed: int = 1337  # seed of the sampling
    device: str = "auto"  # 'auto' (a GPU if present, else cpu), 'cpu', 'cuda', 'cuda:N'
    dtype: str = "auto"  # auto: bfloat16 on GPUs that have it, else float32

    def __post_init__(self) -> None:
        if self.num_samples <= 0 or self.max_new_tokens <= 0:
            raise ValueError("num_samples and max_new_tokens must be > 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k={self.top_k} must be > 0 (or None)")
        train_config.check_dtype(self.dtype)


def load_model_and_tokenizer(cfg: SampleConfig) -> tuple[GPT, tokenizers.Tokenizer]:
    """The model and the tokenizer of a checkpoint or Hugging Face folder, on CPU in fp32."""
    if cfg.init_from == "resume":
        path, state = checkpoint.latest(cfg.out_dir)
        model = checkpoint.load_model(path)
        data = state["dataset"]
        if cfg.tokenizer is not None:
            tok = tokenizers.load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
        else:
            tok = tokenizers.tokenizer_from_meta(data["meta"], data["path"])
        return model, tok
    model = hf_checkpoint.from_hf(cfg.init_from, dtype=torch.float32)
    if cfg.tokenizer is None:
        raise tokenizers.TokenizerError("a Hugging Face folder needs --tokenizer=gpt2|llama2|llama3|qwen3 "
                                        "(and --tokenizer_path for a file of your own)")
    return model, tokenizers.load_tokenizer(cfg.tokenizer, cfg.tokenizer_path or cfg.init_from)


def main(argv: list[str]) -> int:
    return errors.run_command(lambda: sample(argv))


def sample(argv: list[str]) -> int:
    (cfg,), _ = configurator.load(argv, [SampleConfig], __doc__)
    device = parallel.resolve_device(cfg.device)
    model, tok = load_model_and_tokenizer(cfg)
    start = cfg.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    ids = tok.encode(start)
    if tok.bos_id is not None:
        ids = [tok.bos_id] + ids  # as in training: documents start with BOS
    if not ids:
        raise tokenizers.TokenizerError("the prompt is empty for this tokenizer; pass --start=...")
    if max(ids) >= model.config.vocab_size:
        raise tokenizers.TokenizerError(f"the prompt has token id {max(ids)} >= the model's vocab_size "
                                        f"{model.config.vocab_size}; is this the right --tokenizer?")
    model = model.to(device=device, dtype=hardware.resolve_dtype(cfg.dtype, device)).eval()
    torch.manual_seed(cfg.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(cfg.num_samples):
        out = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, eos_id=tok.eos_id,
                       vocab_limit=tok.vocab_size)
        print(tok.decode(out[0].tolist()))
        print("---------------")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
