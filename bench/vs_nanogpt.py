"""
The quickstart's time per iteration, ours against nanoGPT's, side by side in one run.

Ours is the README's command itself: `python train.py config/train_shakespeare_char.py` (4L-4H-128D,
block 64, batch 12), run for --iters iterations into a temporary out_dir. The reference is nanoGPT's
model and training loop for its CPU recipe, rewritten in this file (nanoGPT is not on PyPI): LayerNorm
with bias, fused c_attn and SDPA causal attention, a GELU MLP, a tied head, full logits and
F.cross_entropy, AdamW with decay on 2-D weights (fused=False on CPU), clipping at 1.0, warm-up and
cosine learning rate set every step, and batches drawn at random offsets from a np.memmap re-opened
every call. Both read the same train.bin, with the vocabulary of its meta.json (nanoGPT's meta.pkl
rule: no padding).

    python bench/vs_nanogpt.py                          # 3 rounds of 300 iterations a side, ~2 min on 2 cores
    python bench/vs_nanogpt.py --rounds 5 --iters 500
    python bench/vs_nanogpt.py --smoke --dataset PATH   # seconds; what tests/test_bench.py runs

The sides alternate (ours, nanoGPT, ours, ...), each run a fresh process with the machine's default
threads. Both are timed the same way: the mean time per iteration over each window of 10 iterations past
--skip, ending at a logging step's loss.item() (ours: train.py's own dt_ms, which excludes evaluation and
checkpointing; the reference runs neither). Prints one JSON line per run (its mean over windows), then a
summary line: each side's median window over all its runs, and ratio = ours / nanoGPT (0.95 or
below means ours is at least 5% faster). A shared VM's speed drifts by 10% and more within minutes: the alternation and
the median over windows are there for that; rerun with more --rounds when runs disagree.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import errors  # noqa: E402

CONFIG = "config/train_shakespeare_char.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dataset", default=os.path.join(ROOT, "data", "shakespeare_char"),
                   help="a prepared character-level dataset folder (train.bin, meta.json)")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the median is reported")
    p.add_argument("--iters", type=int, default=300, help="iterations per run")
    p.add_argument("--skip", type=int, default=50, help="iterations not timed at the start of each run")
    p.add_argument("--smoke", action="store_true", help="1 round of 20 iterations, 10 skipped")
    p.add_argument("--side", choices=("nanogpt",), help=argparse.SUPPRESS)  # internal: run the reference
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds, a.iters, a.skip = 1, 20, 10
    if a.rounds < 1 or a.skip < 10 or a.skip % 10 or a.iters < a.skip + 10 or a.iters % 10:
        p.error("--rounds must be >= 1, --skip a positive multiple of 10 and --iters a multiple of 10 at least "
                "--skip + 10 (ours logs every 10 iterations)")
    if not os.path.isfile(os.path.join(a.dataset, "train.bin")) or not os.path.isfile(os.path.join(a.dataset, "meta.json")):
        p.error(f"no train.bin and meta.json in {a.dataset}; run python data/shakespeare_char/prepare.py first")
    return a


# -----------------------------------------------------------------------------
# The nanoGPT reference: its model.py and train.py, reduced to what the CPU recipe executes


def nanogpt_run(dataset: str, iters: int, skip: int) -> dict:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    # config/train_shakespeare_char.py with nanoGPT's README CPU overrides (the same values ours uses)
    n_layer, n_head, n_embd, block_size, batch_size, bias, dropout = 4, 4, 128, 64, 12, True, 0.0
    learning_rate, min_lr, warmup_iters, lr_decay_iters = 1e-3, 1e-4, 100, 2000
    beta1, beta2, weight_decay, grad_clip, log_interval = 0.9, 0.99, 1e-1, 1.0, 10
    with open(os.path.join(dataset, "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]

    class LayerNorm(nn.Module):
        def __init__(self, ndim: int, bias: bool):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(ndim))
            self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

        def forward(self, x):
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
            self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
            self.resid_dropout = nn.Dropout(dropout)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout if self.training else 0,
                                               is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = LayerNorm(n_embd, bias), CausalSelfAttention()
            self.ln_2, self.mlp = LayerNorm(n_embd, bias), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd), drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block() for _ in range(n_layer)]), ln_f=LayerNorm(n_embd, bias)))
            self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # tied
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

        def _init_weights(self, module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

        def forward(self, idx, targets):
            t = idx.size(1)
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def get_batch():
        data = np.memmap(os.path.join(dataset, "train.bin"), dtype=np.uint16, mode="r")  # re-opened: no leak
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    torch.manual_seed(1337)
    model = GPT()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=False)
    X, Y = get_batch()
    t_prev, windows, losses = None, [], []
    for it in range(iters + 1):  # iterations 0..iters, as nanoGPT's loop and ours run
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        _, loss = model(X, Y)
        X, Y = get_batch()  # prefetched during the step, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % log_interval == 0:
            losses.append(loss.item())  # windows of 10 iterations, like ours' dt_ms
            now = time.perf_counter()
            if t_prev is not None and it > skip:
                windows.append(1000 * (now - t_prev) / log_interval)
            t_prev = now
    return {"ms_per_iter": statistics.fmean(windows), "windows": windows, "first_loss": losses[0],
            "last_loss": losses[-1]}


# -----------------------------------------------------------------------------
# The two sides as processes


def run_ours(a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="vs_nanogpt_") as out_dir:
        cmd = [sys.executable, "train.py", CONFIG, f"--dataset={a.dataset}", f"--out_dir={out_dir}",
               f"--max_iters={a.iters}", f"--eval_interval={a.iters}", "--eval_iters=1", "--save_checkpoint=False",
               "--eval_tasks="]  # nanoGPT scores no tasks: time the same work (and a dataset without task files)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"train.py failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
        (log_path,) = glob.glob(os.path.join(out_dir, "run_*.json"))
        with open(log_path) as f:
            records = json.load(f)["training_iterations"]
    # each record's dt_ms is the mean over the 10 iterations before it; keep the windows past --skip
    windows = [r["dt_ms"] for r in records if r["dt_ms"] is not None and r["iter"] > a.skip]
    return {"ms_per_iter": statistics.fmean(windows), "windows": windows, "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"], "command": " ".join(cmd[1:4])}


def run_nanogpt(a: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side=nanogpt", f"--dataset={a.dataset}",
           f"--iters={a.iters}", f"--skip={a.skip}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the nanoGPT reference failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    return errors.run_command(lambda: run(parse_args(argv)))


def run(a: argparse.Namespace) -> int:
    if a.side == "nanogpt":
        print(json.dumps(nanogpt_run(a.dataset, a.iters, a.skip)))
        return 0
    import torch

    runs = {"ours": [], "nanogpt": []}
    for r in range(a.rounds):
        for side, fn in (("ours", run_ours), ("nanogpt", run_nanogpt)):
            res = fn(a)
            runs[side].extend(res["windows"])
            print(json.dumps({"round": r, "side": side, "ms_per_iter": round(res["ms_per_iter"], 3),
                              "first_loss": round(res["first_loss"], 4), "last_loss": round(res["last_loss"], 4)}),
                  flush=True)
    print(json.dumps({"summary": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "iters": a.iters, "skip": a.skip, "rounds": a.rounds,
                      **summarize(runs["ours"], runs["nanogpt"])}))
    return 0


def summarize(ours: list[float], ref: list[float]) -> dict:
    """Each side's median 10-iteration window (ms) and their ratio, all from the unrounded medians; the
    medians are printed to 6 decimals so that a reader can recompute the ratio to its 4."""
    a, b = statistics.median(ours), statistics.median(ref)
    return {"windows_per_side": len(ours), "ours_ms_per_iter": round(a, 6), "nanogpt_ms_per_iter": round(b, 6),
            "ratio": round(a / b, 4)}


if __name__ == "__main__":
    sys.exit(main())
