"""
Tokens/s and memory of one LoRA training step, ours (finetune/lora.py apply_lora on GPT) against Hugging
Face LlamaForCausalLM + peft get_peft_model, with identical base weights and identical adapters, in one
process, as a ratio. Then greedy generation tokens/s of our LoRA model with and without the KV cache.

    python bench/lora_step.py                                   # the small CPU shape
    python bench/lora_step.py --preset 1b --device cuda --dtype bfloat16 --batch_size 4 --seq 1024
    python bench/lora_step.py --smoke --json                    # seconds; what tests/test_bench.py runs

A step is forward, loss, backward and AdamW on the adapters only (r, alpha, dropout and targets as the
Llama-3.1 LoRA guide's configs: r=32, alpha=64, rsLoRA, dropout 0.05, every attention and MLP projection). Our
adapters are added by finetune/train.py's build (build_lora.lora_model), and both sides step the optimizer
finetune/train.py builds (build_lora.optimizer, at finetune/config.py's training defaults). bfloat16 means
a bf16 base with fp32 adapters under bf16 autocast on both sides (peft keeps its adapters in fp32 too).
The two models are timed alternately, ours then HF, for --rounds rounds of --steps steps after
--warmup steps each; the median round is reported. Memory: bytes autograd saves for backward in one
step (both sides, any device), and on CUDA the peak allocated during each side's rounds. The machine may
be shared: compare the ratio, and rerun when rounds disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import errors  # noqa: E402
import parallel  # noqa: E402
from bench.model_step import hf_twin  # noqa: E402  (LlamaForCausalLM, sdpa, our weights)
from finetune import build_lora  # noqa: E402
from finetune.config import TrainingArgs  # noqa: E402
from finetune.lora import LoRAConfig, lora_modules, lora_parameters  # noqa: E402
from generation import generate  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402

LLAMA = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rope", bias=False, rope_theta=500000.0)
# shapes as data: Llama-architecture widths (the 1b and 8b ones are Llama-3.2-1B's and Llama-3.1-8B's)
PRESETS = {
    "smoke": dict(LLAMA, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160),
    "small": dict(LLAMA, vocab_size=8192, n_layer=4, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1408),
    "smollm2": dict(LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                    rope_theta=100000.0),
    "1b": dict(LLAMA, vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
               rope_scaling_factor=32.0),
    "8b": dict(LLAMA, vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
               rope_scaling_factor=8.0),
}
SHAPE_FLAGS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BenchError(errors.UserError):
    """A bad flag: one `error:` line."""


def build_pair(mc: ModelConfig, cfg: LoRAConfig, dtype: torch.dtype, device: str):
    """(ours, theirs): the same random base in dtype and the same nonzero fp32 adapters, on device."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = GPT(mc)
    theirs = get_peft_model(hf_twin(base).to(dtype), LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        use_rslora=cfg.use_rslora))
    ours = build_lora.lora_model(base.to(dtype), cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    named = dict(theirs.named_parameters())
    with torch.no_grad():
        for mname, m in lora_modules(ours):
            i = int(mname.split(".")[1])
            part = "self_attn" if ".attn." in mname else "mlp"
            for n in m.lora_A:
                key = f"base_model.model.model.layers.{i}.{part}.{n}"
                m.lora_B[n].normal_(0, 0.02, generator=g)  # nonzero B: every adapter changes the function
                named[key + ".lora_A.default.weight"].copy_(m.lora_A[n])
                named[key + ".lora_B.default.weight"].copy_(m.lora_B[n])
    return ours.to(device), theirs.to(device)


def make_step(model: torch.nn.Module, is_ours: bool, device: str, dtype: torch.dtype, compile: bool):
    """One training step on (x, y): forward, loss, backward, AdamW over the trainable (adapter) parameters."""
    d, t = parallel.Dist(0, 0, 1, torch.device(device)), TrainingArgs()
    opt = build_lora.optimizer(model, d, parallel.layout(d, zero1=False, fsdp=False), lr=t.learning_rate,
                               betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon)
    fwd = torch.compile(model) if compile else model
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            if is_ours:
                return fwd(x, y)[1]
            logits = fwd(input_ids=x).logits  # the labels are y already: no shift
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_of(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, loss_of


def saved_bytes(loss_of, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves for backward in one forward: each storage counted once,
    the model's own parameters (frozen weights kept for the input gradient) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(x, y)
    loss.backward()
    return sum(seen.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, x: torch.Tensor, y: torch.Tensor, n: int, device: str) -> float:
    """Seconds per step over n steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    sync(device)
    return (time.perf_counter() - t0) / n


@torch.no_grad()
def generation(model: GPT, prompt: torch.Tensor, n: int, device: str, dtype: torch.dtype) -> dict:
    """Greedy tokens/s of generation.generate with and without the KV cache (equal tokens checked)."""
    model.eval()
    out, rate = {}, {}
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    for use_cache in (True, False):
        with autocast:
            generate(model, prompt, 2, temperature=0, use_cache=use_cache)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            out[use_cache] = generate(model, prompt, n, temperature=0, use_cache=use_cache)
            sync(device)
        rate[use_cache] = prompt.size(0) * n / (time.perf_counter() - t0)
    model.train()
    return {"gen_tokens_per_sec_cache": rate[True], "gen_tokens_per_sec_no_cache": rate[False],
            "gen_cache_speedup": rate[True] / rate[False], "gen_tokens_equal": bool(torch.equal(out[True], out[False]))}


def parse(argv: list[str]) -> argparse.Namespace:
    p = errors.ArgumentParser(prog="bench/lora_step.py", description="LoRA train step: ours vs HF + peft, same weights.")
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="a model shape (Llama architecture)")
    for name in SHAPE_FLAGS:
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset's")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the base weights' and the step's dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of both sides; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first")
    p.add_argument("--r", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha (the scale is alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on the adapters' input")
    p.add_argument("--gen_tokens", type=int, default=64, help="new tokens in the generation comparison")
    p.add_argument("--smoke", action="store_true", help="the smoke shape, 1 round of 1 step: seconds")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.rounds, args.steps, args.warmup, args.seq, args.batch_size = "smoke", 1, 1, 1, 32, 2
        args.gen_tokens = 8
    for name in ("batch_size", "seq", "steps", "rounds", "r", "gen_tokens", *SHAPE_FLAGS):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchError(f"--{name}={value} must be >= 1")
    if args.warmup < 0:
        raise BenchError(f"--warmup={args.warmup} must be >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device={args.device} but no CUDA device is available; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise BenchError(f"--device={args.device} must be cpu or cuda[:N]")
    if args.dtype == "bfloat16" and args.device == "cpu":
        raise BenchError("--dtype=bfloat16 is for --device cuda; CPU steps run in float32")
    return args


def run(args: argparse.Namespace) -> dict:
    """Build both models, check they compute the same function, time them alternately; one record."""
    shape = dict(PRESETS[args.preset], **{k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None})
    mc = ModelConfig(block_size=args.seq + args.gen_tokens + 16, **shape)
    cfg = LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, use_rslora=True)
    device, dtype = args.device, DTYPES[args.dtype]
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    ours, theirs = build_pair(mc, cfg, dtype, device)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, mc.vocab_size, (args.batch_size, args.seq), generator=g).to(device)
    y = torch.randint(0, mc.vocab_size, (args.batch_size, args.seq), generator=g).to(device)
    steps = {"ours": make_step(ours, True, device, dtype, args.compile),
             "hf": make_step(theirs, False, device, dtype, args.compile)}
    with torch.no_grad():  # the same function (dropout off) before anything is timed
        ours.eval(), theirs.eval()
        probe = x[:1, :64]
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            diff = (ours(probe)[0].float() - theirs(input_ids=probe).logits.float()).abs().max().item()
        ours.train(), theirs.train()
    saved = {name: saved_bytes(loss_of, x, y, model) for (name, (_, loss_of)), model in zip(steps.items(), (ours, theirs))}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    peak = {"ours": 0.0, "hf": 0.0}
    for step, _ in steps.values():
        for _ in range(args.warmup):
            step(x, y)
    for _ in range(args.rounds):
        for name, (step, _) in steps.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[name].append(timed(step, x, y, args.steps, device))
            if device.startswith("cuda"):
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 1024**3)
    tok = {k: args.batch_size * args.seq / statistics.median(v) for k, v in times.items()}
    n_adapter = sum(p.numel() for p in lora_parameters(ours))
    record = {
        "architecture": mc.arch_string, "vocab_size": mc.vocab_size, "n_params": ours.num_params(),
        "n_adapter_params": n_adapter, "r": cfg.r, "device": device, "dtype": args.dtype, "compile": args.compile,
        "batch_size": args.batch_size, "seq": args.seq, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "max_abs_logits_diff": diff, "rounds": args.rounds, "steps_per_round": args.steps,
        "ours_tokens_per_sec": tok["ours"], "hf_tokens_per_sec": tok["hf"], "ratio": tok["ours"] / tok["hf"],
        "ours_round_ms": [1000 * t for t in times["ours"]], "hf_round_ms": [1000 * t for t in times["hf"]],
        "ours_saved_gib": saved["ours"] / 1024**3, "hf_saved_gib": saved["hf"] / 1024**3,
        "ours_peak_gib": peak["ours"] if device.startswith("cuda") else None,
        "hf_peak_gib": peak["hf"] if device.startswith("cuda") else None,
    }
    del steps, theirs
    prompt = x[:, : min(args.seq, 32)]
    return record | generation(ours, prompt, args.gen_tokens, device, dtype)


def report(r: dict) -> str:
    """The record as a few readable lines."""
    lines = [f"model: {r['architecture']}, vocab {r['vocab_size']}, {r['n_params']:,} params, "
             f"{r['n_adapter_params']:,} adapter params (r={r['r']}, every projection)",
             f"device: {r['device']} ({r['threads']} threads), dtype {r['dtype']}, compile {r['compile']}, "
             f"batch {r['batch_size']} x seq {r['seq']}, torch {r['torch']}",
             f"max |logits diff| ours vs HF+peft before timing: {r['max_abs_logits_diff']:.2e}"]
    for name, label in (("ours", "ours"), ("hf", "HF+peft")):
        peak = f", peak {r[f'{name}_peak_gib']:.2f} GiB" if r[f"{name}_peak_gib"] is not None else ""
        rounds = " ".join(f"{t:.0f}" for t in r[f"{name}_round_ms"])
        lines.append(f"{label:>8}: {r[f'{name}_tokens_per_sec']:10,.0f} tokens/s, saved activations "
                     f"{r[f'{name}_saved_gib']:.3f} GiB{peak}  (ms/step per round: {rounds})")
    lines.append(f"ratio ours / HF+peft: {r['ratio']:.2f}x (median of {r['rounds']} alternating rounds)")
    lines.append(f"generation (ours, greedy, batch {r['batch_size']}): {r['gen_tokens_per_sec_cache']:,.0f} tokens/s "
                 f"with the KV cache, {r['gen_tokens_per_sec_no_cache']:,.0f} without "
                 f"({r['gen_cache_speedup']:.1f}x; same tokens: {r['gen_tokens_equal']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    def body() -> int:
        args = parse(argv)
        r = run(args)
        print(json.dumps(r) if args.json else report(r))
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
