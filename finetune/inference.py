"""
Greedy generation from a fine-tuned model: a merged folder, or a base folder plus an adapter.

    cd finetune
    python inference.py --model_path OUT/merged --prompt "What is 12 + 30?"
    python inference.py --model_path BASE_DIR --adapter_path OUT/checkpoint-best --input_file prompts.txt

The model folder is a Hugging Face folder (hf_checkpoint.from_hf) with its tokenizer files (or --tokenizer DIR).
The prompt is rendered with --template, by default the template the adapter was trained with (the
prompt_template.json that finetune/train.py writes beside every adapter and merge_adapter.py copies into
the merged folder; `none` sends the prompt as is), tokenized as in training (sft_data: the tokenizer's BOS
policy) and decoded greedily with the KV cache of generation.generate until EOS, the end of a marked answer's
line (`#### N`), or --max_new_tokens. --prompt prints the completion; --input_file (one prompt
per line) prints one JSON line per prompt: prompt, completion and the number answers.py extracts.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import configurator  # noqa: E402
import errors  # noqa: E402
from errors import ConfigError  # noqa: E402
from finetune.answers import extract_answer  # noqa: E402
from finetune.lora import load_adapted  # noqa: E402
from finetune.sft_data import TEMPLATE_FILE, TEMPLATES, render_prompt  # noqa: E402
from finetune.sft_eval import generate_answers  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def render(prompts: list[str], template: str) -> list[dict]:
    """Examples for sft_eval.generate_answers: each prompt through TEMPLATES[template] (or as is for none)."""
    return [{"prompt": p if template == "none" else render_prompt(p, template)} for p in prompts]


def trained_template(*folders: str | None) -> str:
    """The template recorded beside the adapter (or in a merged folder): the first folder's TEMPLATE_FILE; else
    'none', saying so on stderr."""
    for folder in (f for f in folders if f):
        path = os.path.join(folder, TEMPLATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                name = json.load(f).get("template", "none")
            if name not in TEMPLATES and name != "none":
                raise ConfigError(f"{path} names the template {name!r}, which this version does not have; "
                                  f"pass --template")
            return name
    print(f"note: no {TEMPLATE_FILE} beside the model, so the prompt is sent as is; pass --template to "
          f"format it as in training", file=sys.stderr)
    return "none"


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a text file (one prompt per line)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--input_file={path} not found; pass a text file with one prompt per line")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"--input_file={path} is not UTF-8 text; pass one prompt per line") from None
    if not prompts:
        raise ConfigError(f"--input_file={path} holds no prompt; write one prompt per line")
    return prompts


def complete(model_path: str, prompts: list[str], *, adapter_path: str | None = None, tokenizer: str | None = None,
             template: str = "none", max_new_tokens: int = 256, batch_size: int = 8, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> list[str]:
    """Greedy completions of prompts by the model (base + adapter when adapter_path is given)."""
    model = load_adapted(model_path, adapter_path).to(device=device, dtype=dtype)
    return generate_answers(model, render(prompts, template), tokenizer or model_path, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, device=device)


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(prog="inference.py", description="Greedy generation from a merged model or a base + adapter.")
    parser.add_argument("--model_path", required=True, help="a Hugging Face model folder (merged, or the base)")
    parser.add_argument("--adapter_path", default=None, help="a PEFT-format adapter folder to apply to the base")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="one prompt")
    src.add_argument("--input_file", default=None, help="a text file, one prompt per line")
    parser.add_argument("--template", default=None, choices=["none", *TEMPLATES],
                        help="the prompt template (default: the one the adapter was trained with, read from "
                             f"{TEMPLATE_FILE}); none: the prompt as is")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: --model_path)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="tokens generated per prompt at most")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts decoded together (left padded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the weights' dtype")

    def body() -> int:
        args = parser.parse_args(argv)
        for flag in ("max_new_tokens", "batch_size"):
            if getattr(args, flag) < 1:
                raise ConfigError(f"--{flag}={getattr(args, flag)} must be >= 1")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device={args.device} but no CUDA device is available; use --device cpu")
        model_path = configurator.check_input_dir(args.model_path, "--model_path", ("config.json",))
        adapter = args.adapter_path and configurator.check_input_dir(
            args.adapter_path, "--adapter_path", ("adapter_config.json", "adapter_model.safetensors"))
        tokenizer = configurator.check_input_dir(args.tokenizer or model_path,
                                                 "--tokenizer" if args.tokenizer else "--model_path",
                                                 ("tokenizer_config.json",))
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.input_file)
        template = args.template or trained_template(adapter, model_path)
        texts = complete(model_path, prompts, adapter_path=adapter, tokenizer=tokenizer, template=template,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device,
                         dtype=DTYPES[args.dtype])
        if args.prompt is not None:
            print(texts[0])
        else:
            for p, t in zip(prompts, texts):
                print(json.dumps({"prompt": p, "completion": t, "answer": extract_answer(t)}))
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
