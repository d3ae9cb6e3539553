"""
A whole LoRA fine-tuning job, ours (finetune/train.py) against Hugging Face transformers.Trainer + peft on
the same base, data, template and hyperparameters, side by side on this machine: wall time from the command's
start to its last eval loss, and that loss. peft and the Trainer are the reference here; finetune/ never
imports them.

    python bench/lora_sft_vs_hf.py finetune/configs/smollm2/smollm2_math_cpu.yaml model.name_or_path=DIR \
        training.max_steps=60 --rounds 2
    python bench/lora_sft_vs_hf.py CONFIG section.key=value ... --smoke          # one round, what the tests run
    python bench/lora_sft_vs_hf.py CONFIG --profile 5                            # where our step's time goes

What both sides do, each in a fresh process: load the base in fp32, add LoRA (the config's r, alpha, rsLoRA,
init and targets; the bench sets dropout 0, since each library draws its masks from its own RNG: a
lora.dropout=P of yours wins), read the config's local .json/.jsonl data with its template and evaluate the
eval loss before training, train max_steps optimizer steps (no spectral refactor) with AdamW, the config's LR,
warmup, gradient accumulation and clipping and a cosine decay to min_lr_ratio, then evaluate again. The
Trainer's warmup and loss over accumulated micro-batches are finetune/train.py's (tests/test_finetune_vs_hf.py
holds every step's LR and loss equal). Ours tokenizes and batches
with finetune/sft_data.py; the Trainer's side with transformers alone (hf_examples: AutoTokenizer on the
templated prompt + response + EOS, labels -100 on the prompt; hf_collator: DataCollatorForSeq2Seq, padded to a
multiple of 8 as ours), reading the examples in our SFTLoader's order, so both see the same batches. Eval loss
is the mean over every response token of the eval set on both sides. No answer decoding: it is ours alone.
Prints one JSON line per side and round, then the summary: median seconds per side, ratio hf / ours, and
the eval losses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import errors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the settings both sides share, on top of the user's: see the module docstring
SHARED = ["trainer.name=Trainer", "training.lr_scheduler_type=cosine", "dataset.answer_eval_samples=0"]
# what the bench adds for its timed runs: each library draws its dropout masks from its own RNG
BENCH = ["lora.dropout=0"]
# The prompt templates as a Hugging Face user writes them: the text of finetune/sft_data.TEMPLATES, written
# apart on purpose (tests/test_finetune_vs_hf.py compares the token ids the two sides make).
HF_TEMPLATES = {
    "qa": "Question: {prompt}\nAnswer:\n",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
    "plain": "{prompt}\n",
}


def ours_argv(config: str, overrides: list[str], out_dir: str) -> list[str]:
    """finetune/train.py's arguments for the job: one log record per step, one evaluation before and after."""
    t = cfg_training(config, overrides)
    return ["--config", os.path.abspath(config), *overrides, *SHARED, f"training.output_dir={out_dir}",
            f"training.eval_steps={t.max_steps}", f"training.save_steps={t.max_steps}",
            "training.overwrite_output_dir=true", "training.logging_steps=1"]


def ours_result(out_dir: str, seconds: float) -> dict:
    """(seconds, eval losses, per-step train losses) from the run log finetune/train.py wrote into out_dir."""
    (log,) = [os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("run_") and f.endswith(".json")]
    with open(log) as f:
        run = json.load(f)
    return {"side": "ours", "seconds": seconds, "eval_loss": [e["eval/loss"] for e in run["evaluations"]],
            "train_loss": [r["loss"] for r in run["training_iterations"]],
            "lr": [r["lr"] for r in run["training_iterations"]]}


def ours(config: str, overrides: list[str], out_dir: str) -> dict:
    """finetune/train.py as a user runs it, in a fresh process."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "train.py", *ours_argv(config, overrides, out_dir)],
                       cwd=os.path.join(ROOT, "finetune"), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"finetune/train.py failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return ours_result(out_dir, seconds)


def cfg_training(config: str, overrides: list[str]):
    from finetune.config import load_config

    return load_config(config, [*overrides, *SHARED]).training


def hf_examples(path: str, fields: dict | None, template: str | None, tokenizer, max_length: int,
                limit: int | None = None) -> list[dict]:
    """A local .json/.jsonl file's examples as a Hugging Face user tokenizes them, with none of sft_data's code:
    the templated prompt + response + EOS in one tokenizer call (truncated to max_length), labels -100 on the
    prompt's tokens (BOS included); an example whose prompt leaves no response token is left out."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    rows = rows[:limit] if limit is not None else rows
    if fields:
        p_field, r_field = fields["prompt"], fields["response"]
    else:  # GSM8K's columns, else MetaMathQA's, each with its dataset's template
        p_field, r_field = ("question", "answer") if "question" in rows[0] else ("query", "response")
    frame = HF_TEMPLATES[template or ("qa" if p_field == "question" else "alpaca")]
    out = []
    for row in rows:
        prompt = frame.format(prompt=str(row[p_field]).strip())
        ids = tokenizer(prompt + str(row[r_field]) + tokenizer.eos_token, truncation=True,
                        max_length=max_length)["input_ids"]
        n = len(tokenizer(prompt)["input_ids"])
        if len(ids) > n:
            out.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    return out


def hf_collator(tokenizer):
    """transformers' DataCollatorForSeq2Seq: right padding, labels -100 on it, an attention mask; lengths rounded
    up to a multiple of 8 as our SFTLoader's (the same GEMM shapes, and the same dropout-mask shapes)."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice; padded positions are masked out
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100,
                                  return_tensors="pt")


def hf_run(config: str, overrides: list[str], out_dir: str, callbacks: tuple = ()) -> dict:
    """The same job with transformers.Trainer + peft, in this process (the bench runs it in a fresh one).

    The data is tokenized and batched by transformers (hf_examples, hf_collator); only the order of the
    examples is our SFTLoader's. callbacks: TrainerCallbacks (the test's dropout reseed)."""
    t0 = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from finetune.config import grad_accum_steps, load_config, resolve_model_path
    from finetune.sft_data import SFTLoader

    cfg = load_config(config, [*overrides, *SHARED])
    ds, t, lo = cfg.dataset, cfg.training, cfg.lora
    path = resolve_model_path(cfg.model.name_or_path)
    accum = grad_accum_steps(cfg, 1)
    if not all(s.endswith((".json", ".jsonl")) for s in (ds.source, ds.eval_data()[0])):
        raise errors.ConfigError("the bench's HF side reads local .json/.jsonl data; write it with "
                                 "finetune/data/make_math.py")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or path)
    collate = hf_collator(tokenizer)
    train = hf_examples(ds.source, ds.fields, ds.template, tokenizer, ds.max_length, ds.max_train_samples)
    source, _, fields = ds.eval_data()
    evals = hf_examples(source, fields, ds.template, tokenizer, ds.max_length, ds.max_eval_samples)
    # our order of examples (SFTLoader reads only their lengths): step k's micro-batches, in turn
    loader = SFTLoader([(r["input_ids"], r["labels"]) for r in train], t.per_device_train_batch_size, accum,
                       seed=t.seed)
    dataset = [train[int(i)] for k in range(t.max_steps * accum) for i in loader.indices(k)]
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    init = {"default": True, "gaussian": "gaussian"}.get(lo.init, lo.init)  # peft's names for ours
    model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                             use_rslora=lo.use_rslora, target_modules=list(lo.target_modules),
                                             init_lora_weights=init))

    @torch.no_grad()
    def eval_loss() -> float:
        """The mean over every response token of the eval set (the model's loss is a per-batch mean)."""
        model.eval()
        total = count = 0.0
        for start in range(0, len(evals), t.per_device_eval_batch_size):
            batch = collate(evals[start:start + t.per_device_eval_batch_size])
            n = (batch["labels"][:, 1:] != -100).sum().item()
            total += model(**batch).loss.item() * n
            count += n
        model.train()
        return total / count

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=t.per_device_train_batch_size,
                             gradient_accumulation_steps=accum, max_steps=t.max_steps, learning_rate=t.learning_rate,
                             lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
                             warmup_steps=t.warmup_ratio,  # below 1 (load_config): the Trainer's ceil(ratio x steps)
                             weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                             adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=t.seed,
                             disable_tqdm=True)
    before = eval_loss()
    trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=list(callbacks))
    trainer.train()
    after = eval_loss()
    history = trainer.state.log_history
    return {"side": "hf", "seconds": time.perf_counter() - t0, "eval_loss": [before, after],
            "train_loss": [h["loss"] for h in history if "loss" in h],
            "lr": [h["learning_rate"] for h in history if "loss" in h]}


def profile_ours(config: str, overrides: list[str], steps: int, warmup: int = 2) -> dict:
    """Where our step's time goes: `steps` of loop.train_step (the step finetune/train.py runs, on its
    batches in its order, with the bench's settings: dropout 0 unless yours) under torch.profiler after `warmup` steps.
    Returns the seconds of loading the base and of apply_lora (PiSSA's SVDs), ms per step, the share of CPU
    time in aten::mm/addmm, the share of targets that are prompt or padding (-1: the output head's work
    there is spent on nothing), and the top ops by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import hf_checkpoint
    import loop
    import parallel
    import runlog
    from finetune import build_lora
    from finetune.config import grad_accum_steps, load_config, lora_config, resolve_model_path
    from finetune.sft_data import SFTLoader, load_examples, tokenize_examples

    cfg = load_config(config, [*overrides, *SHARED])
    ds, t = cfg.dataset, cfg.training
    accum = grad_accum_steps(cfg, 1)
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    with contextlib.chdir(os.path.join(ROOT, "finetune")):  # where a config's relative paths point, as for ours()
        path = resolve_model_path(cfg.model.name_or_path)
        train = tokenize_examples(load_examples(ds.source, ds.split, fields=ds.fields, limit=ds.max_train_samples,
                                                template=ds.template), cfg.model.tokenizer or path, ds.max_length)
    torch.manual_seed(t.seed)
    t0 = time.perf_counter()
    base = hf_checkpoint.from_hf(path, dtype=torch.float32)  # finetune/train.py's build_model, timed in two
    t1 = time.perf_counter()
    model = build_lora.lora_model(base, lora_config(cfg), t.seed)
    start_up = {"load_base_s": round(t1 - t0, 3), "apply_lora_s": round(time.perf_counter() - t1, 3)}
    train_model, optimizer = build_lora.wrap_and_optimizer(
        model, d, parallel.layout(d, zero1=False, fsdp=False), torch.float32,
        gradient_checkpointing=t.gradient_checkpointing, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay, eps=t.adam_epsilon)
    batches = SFTLoader(train, t.per_device_train_batch_size, accum, seed=t.seed)
    seen: list[torch.Tensor] = []

    class Recording:  # the loader, keeping the profiled steps' targets
        def next_batch(self):
            x, y = batches.next_batch()
            seen.append(y)
            return x, y

    steps_loop = loop.Loop(d, model, train_model, optimizer, Recording(), runlog.RunLog("", False, {}), accum=accum,
                           max_iters=warmup + steps, lr_at=lambda it: t.learning_rate,
                           evaluate_and_save=lambda run, done: None, save=lambda run: None, grad_clip=t.max_grad_norm)
    run = loop.RunState()
    for _ in range(warmup):
        loop.train_step(steps_loop, run)
    seen.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.train_step(steps_loop, run)
        seconds = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm"))
    targets = torch.cat([y.flatten() for y in seen])
    return {"profile": True, **start_up, "steps": steps, "batch_shapes": sorted({tuple(y.shape) for y in seen}),
            "ms_per_step": round(1000 * seconds / steps, 1), "gemm_share": round(gemm / total, 3),
            "ignored_target_share": round(float((targets == -1).float().mean()), 3),
            "top_ops_ms_per_step": [[e.key, round(e.self_cpu_time_total / 1000 / steps, 1)] for e in ops[:6]]}


def run(argv: list[str]) -> int:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("config", help="a fine-tuning YAML (finetune/configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as finetune/train.py takes them")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of both sides")
    p.add_argument("--smoke", action="store_true", help="one round (the tests' tiny config)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="instead of the two jobs: profile STEPS of our training step (where the time goes)")
    p.add_argument("--side", choices=("hf",), help=argparse.SUPPRESS)
    p.add_argument("--out_dir", help=argparse.SUPPRESS)
    a = p.parse_intermixed_args(argv)
    if a.side == "hf":
        print(json.dumps(hf_run(a.config, a.overrides, a.out_dir)))
        return 0
    overrides = [*BENCH, *a.overrides]  # a user's own lora.dropout wins
    if a.profile:
        print(json.dumps(profile_ours(a.config, overrides, a.profile)))
        return 0
    if a.rounds < 1:
        raise errors.ConfigError(f"--rounds={a.rounds} must be >= 1")
    if cfg_training(a.config, overrides).max_steps <= 0:  # a bad config is one error line here, before any run
        raise errors.ConfigError("the bench runs a set number of steps: add training.max_steps=N")
    runs: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="lora_sft_vs_hf_") as tmp:
        for r in range(1 if a.smoke else a.rounds):
            res = ours(a.config, overrides, os.path.join(tmp, f"ours{r}"))
            runs["ours"].append(res)
            print(json.dumps({"round": r, **res}), flush=True)
            t0 = time.perf_counter()
            # in finetune/, as ours runs: a config's relative data paths mean the same on both sides
            hp = subprocess.run([sys.executable, os.path.abspath(__file__), os.path.abspath(a.config), *overrides,
                                 "--side", "hf", "--out_dir", os.path.join(tmp, f"hf{r}")], capture_output=True,
                                text=True, cwd=os.path.join(ROOT, "finetune"), timeout=3600)
            if hp.returncode:
                raise RuntimeError(f"the HF Trainer side failed (exit {hp.returncode}):\n{hp.stderr[-3000:]}")
            res = json.loads(hp.stdout.strip().splitlines()[-1]) | {"seconds": time.perf_counter() - t0}
            runs["hf"].append(res)
            print(json.dumps({"round": r, **res}), flush=True)
    mine, theirs = (statistics.median(x["seconds"] for x in runs[s]) for s in ("ours", "hf"))
    print(json.dumps({"summary": True, "ours_seconds": round(mine, 1), "hf_seconds": round(theirs, 1),
                      "ratio_hf_over_ours": round(theirs / mine, 3),
                      "ours_eval_loss": runs["ours"][-1]["eval_loss"][-1], "hf_eval_loss": runs["hf"][-1]["eval_loss"][-1]}))
    return 0


def main(argv: list[str]) -> int:
    return errors.run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
