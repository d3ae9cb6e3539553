"""
What each spectral refactor mode (finetune/spectral.py) does to a PiSSA model, without training and after it.

    python bench/lora_refactor.py finetune/configs/smollm2/smollm2_math_cpu.yaml model.name_or_path=DIR \
        --text data/shakespeare_char/input.txt --bound 40 --adapters none=OUT_NONE balanced=OUT_BALANCED ...
    python bench/lora_refactor.py CONFIG section.key=value ... --text FILE --smoke     # what the tests run

1. At init. The config's base with its LoRA (PiSSA: the adapter holds the base weights' top-r singular
   directions, and base + adapter is the base's function), then one refactor in each mode and no training.
   Per mode: the largest singular value of scaling * B A before and after, the relative change of the
   adapted weights (sum over adapters of ||s (B'A' - BA)||_F^2, over the sum of ||W||_F^2 of the original
   weights, square-rooted), the eval loss on the config's eval set (response tokens), and the loss on --text
   (plain text the model saw in pretraining, not the task).
2. After training (--adapters NAME=DIR ...): each fine-tuned adapter (a PEFT folder finetune/train.py wrote)
   on the original base, and the base alone: the loss on --text. What fine-tuning cost the model outside
   its task.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import errors  # noqa: E402


def text_batches(tokenizer: str, path: str, seq_len: int, n_seq: int, batch: int = 8) -> list:
    """(x, y) batches of n_seq windows of seq_len tokens from the start of a text file."""
    import torch
    from transformers import AutoTokenizer

    if not os.path.isfile(path):
        raise errors.UserError(f"--text {path} not found; give a plain-text file (e.g. data/shakespeare_char/"
                                     f"input.txt after python data/shakespeare_char/prepare.py)")
    with open(path, encoding="utf-8") as f:
        text = f.read(seq_len * n_seq * 8)  # enough characters for n_seq windows at any tokenizer's rate
    ids = AutoTokenizer.from_pretrained(tokenizer)(text, add_special_tokens=False)["input_ids"]
    n = min(n_seq, (len(ids) - 1) // seq_len)
    if n == 0:
        raise errors.UserError(f"--text {path} holds fewer than {seq_len + 1} tokens")
    t = torch.tensor(ids[: n * seq_len + 1])
    x, y = t[:-1].view(n, seq_len), t[1:].view(n, seq_len)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def mean_loss(model, batches: list) -> float:
    """The mean next-token loss over every target of batches (the model's chunked loss)."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            n = int((y != -1).sum())
            total += float(model(x, y)[1]) * n
            count += n
    return total / count


def adapted_weight_change(model, before: dict) -> float:
    """sqrt(sum ||s (B'A' - BA)||^2 / sum ||W||^2) over the adapters, W the original weight (residual + s B A)."""
    import torch

    from finetune.lora import lora_modules

    num = den = 0.0
    for name, m in lora_modules(model):
        for slot in m.names:
            A, B = m.lora_A[slot].detach(), m.lora_B[slot].detach()
            A0, B0 = before[f"{name}.lora_A.{slot}"], before[f"{name}.lora_B.{slot}"]
            delta = m.scaling * (B @ A - B0 @ A0)
            w = m.weight[m.row_range(slot)] + m.scaling * (B0 @ A0)
            num += float(torch.linalg.matrix_norm(delta) ** 2)
            den += float(torch.linalg.matrix_norm(w) ** 2)
    return (num / den) ** 0.5


def run(argv: list[str]) -> int:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("config", help="a fine-tuning YAML (finetune/configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as finetune/train.py takes them")
    p.add_argument("--text", required=True, help="a plain-text file: the loss outside the task")
    p.add_argument("--bound", type=float, default=None, help="clamp's bound (default: half the largest value)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="NAME=DIR", help="fine-tuned adapters to compare")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per window of --text")
    p.add_argument("--n_seq", type=int, default=32, help="windows of --text the loss is taken over")
    p.add_argument("--smoke", action="store_true", help="few windows (the tests)")
    a = p.parse_args(argv)
    adapters = []
    for item in a.adapters:
        name, sep, folder = item.partition("=")
        if not sep or not name or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise errors.UserError(f"--adapters {item}: give NAME=DIR with DIR an adapter folder "
                                         f"(adapter_config.json + adapter_model.safetensors)")
        adapters.append((name, folder))
    if a.smoke:
        a.seq_len, a.n_seq = 16, 4

    import torch

    import hf_checkpoint
    from finetune.config import load_config, lora_config, resolve_model_path
    from finetune.lora import apply_lora, load_adapted, load_lora_state_dict, lora_state_dict
    from finetune.sft_data import eval_batches, load_examples, tokenize_examples
    from finetune.spectral import spectral_refactor

    cfg = load_config(a.config, a.overrides)
    ds = cfg.dataset
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = cfg.model.tokenizer or path
    text = text_batches(tokenizer, a.text, a.seq_len, a.n_seq)
    source, split, fields = ds.eval_data()
    evals = tokenize_examples(load_examples(source, split, fields=fields, limit=4 if a.smoke else ds.max_eval_samples,
                                            template=ds.template), tokenizer, ds.max_length)
    task = eval_batches(evals, cfg.training.per_device_eval_batch_size)

    model = hf_checkpoint.from_hf(path, dtype=torch.float32)
    base_text = mean_loss(model, text)
    apply_lora(model, lora_config(cfg), seed=cfg.training.seed)
    init = {k: v.clone() for k, v in lora_state_dict(model).items()}
    bound = a.bound
    for mode in ("none", "exact", "balanced", "clamp", "delta"):
        load_lora_state_dict(model, init)
        stats = {}
        if mode != "none":
            stats = spectral_refactor(model, None, mode=mode, lam=cfg.trainer.refactor_lambda, bound=bound)
        if mode == "exact" and bound is None:  # clamp's default bound: half the largest value, which exact reads
            bound = stats["sv_max_before"] / 2
        print(json.dumps({"at": "init", "mode": mode, "bound": bound if mode == "clamp" else None,
                          "sv_max_before": stats.get("sv_max_before"), "sv_max_after": stats.get("sv_max_after"),
                          "weight_change": adapted_weight_change(model, init), "eval_loss": mean_loss(model, task),
                          "text_loss": mean_loss(model, text)}), flush=True)
    print(json.dumps({"after": "base", "text_loss": base_text}), flush=True)
    for name, folder in adapters:
        print(json.dumps({"after": name, "text_loss": mean_loss(load_adapted(path, folder), text)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return errors.run_command(lambda: run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
