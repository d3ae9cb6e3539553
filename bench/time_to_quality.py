"""
Time to quality on the quickstart (and a larger case): how soon each recipe reaches the val loss that nanoGPT's
recipe (AdamW + cosine, config/train_shakespeare_char.py as it is) ends at, in iterations and whole-process time.

    python bench/time_to_quality.py                      # 3 seeds x the quickstart's 4 recipes, side by side
    python bench/time_to_quality.py --sweep              # the learning-rate sweep behind the recipes' lr scales
    python bench/time_to_quality.py --step_share         # the optimizer's share of a step, AdamW and Muon
    python bench/time_to_quality.py --step_share --recipes adamw_cosine,muon_wsd,muon_wsd_ns3,muon_wsd_b24
    python bench/time_to_quality.py --recipes adamw_cosine,muon_wsd,muon_wsd_ns3 --seeds 1   # a lever beside
    python bench/time_to_quality.py --recipes muon_wsd_ns4_b24_350 --seeds 1 --target 1.8689   # iterations only
    python bench/time_to_quality.py --case tiny_llama3 --seeds 1   # the larger case: config/tiny_llama3.py
    python bench/time_to_quality.py --keep_logs runs/ttq # keep each run's log for plots/compare_runs.py --time
    python bench/time_to_quality.py --smoke --dataset PATH   # seconds; what tests/test_bench.py runs

Cases (--case): quickstart, nanoGPT's CPU recipe (config/train_shakespeare_char.py); tiny_llama3, the larger
case (config/tiny_llama3.py, 4L-6H-192D SwiGLU/RoPE/GQA, 8 x 128 tokens a step, on the same data, with an
AdamW + cosine schedule of 1200 iterations as its reference). Each case has the recipes of its table, levers
that --recipes can add (fewer Newton-Schulz steps, shorter schedules, more tokens per step) and an lr sweep.

Each run is `python train.py <the case's config> <the recipe's overrides> --seed=S` in a process
of its own, without checkpoints, evaluating every --eval_interval iterations (the same for every recipe of
one batch size, so evaluation costs each the same per iteration; a recipe with k times the tokens per step
evaluates every --eval_interval/k, at the same tokens seen, on the same val windows). Its wall time is
counted from the process's start (imports, data, model build included) to the line that prints the evaluation, read from its stdout as it comes.
The target is the mean over seeds of the reference recipe's final val loss; a recipe reaches it at its
first evaluation at or below it.

Load: on a shared machine the recipes of one seed run at the same time, one process each with one thread
(--threads), and the seeds follow each other: every recipe meets the same load at the same moment. A run
that ends first leaves its core to the others, so under other work the longer run's end goes faster
(bench/RESULTS.md measured it); --step_share's step costs, one process taking turns, do not depend on it. On a
quiet machine, --serial --threads 0 runs one process at a time with every core, as a user would.
Prints one JSON line per run, then one summary line per recipe (medians over seeds) and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configurator  # noqa: E402
import errors  # noqa: E402

REFERENCE = "adamw_cosine"
MUON = ["--optimizer=muon"]
WSD = ["--lr_schedule=wsd", "--lr_decay_fraction=0.3"]


def schedule(iters: int, warmup: int | None = None) -> list[str]:
    """A run of iters iterations whose schedule ends with it (the schedule's length is part of the recipe)."""
    return [f"--max_iters={iters}", f"--lr_decay_iters={iters}", *([f"--warmup_iters={warmup}"] if warmup else [])]


@dataclass(frozen=True)
class Case:
    """A model, its data and its recipes: train.py's config, the overrides every run of the case takes, the
    recipes of the table (name -> overrides; REFERENCE is the AdamW recipe whose final val loss is the target),
    the levers (more recipes --recipes can name) and the lr sweep."""

    config: str
    base: list[str]
    recipes: dict[str, list[str]]
    levers: dict[str, list[str]]
    sweep: dict[str, list[str]]


SHORT = schedule(800)
# Levers on the quickstart's Muon + WSD toward fewer seconds to the target: fewer Newton-Schulz steps, a
# shorter schedule, more tokens per step (eval_iters scaled so that every evaluation reads the same 240
# windows, eval_interval so that evaluations fall at the same tokens seen; lr up by about sqrt(batch))
B24 = ["--batch_size=24", "--eval_iters=10", "--eval_interval=25", "--learning_rate=1.4e-3", "--min_lr=1.4e-4"]
QUICKSTART_LEVERS = {
    "muon_wsd_ns3": [*MUON, "--muon_lr_scale=5", *WSD, *SHORT, "--muon_ns_steps=3"],
    "muon_wsd_ns4": [*MUON, "--muon_lr_scale=5", *WSD, *SHORT, "--muon_ns_steps=4"],
    "muon_wsd_600": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(600)],
    "muon_wsd_ns3_600": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(600), "--muon_ns_steps=3"],
    "muon_wsd_ns3_500": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(500), "--muon_ns_steps=3"],
    "muon_wsd_b24": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(450, 50), *B24],
    # b24 with a schedule that ends near the tokens muon_wsd needs, and 4 Newton-Schulz steps
    **{f"muon_wsd_ns4_b24_{n}": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(n, 50), *B24, "--muon_ns_steps=4"]
       for n in (350, 375)},
    "muon_wsd_b48": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(300, 25), "--batch_size=48", "--eval_iters=5",
                     "--eval_interval=12", "--learning_rate=2e-3", "--min_lr=2e-4"],
}
CASES = {
    # nanoGPT's CPU recipe as config/train_shakespeare_char.py has it; the lr scales come from the sweep
    "quickstart": Case(
        "config/train_shakespeare_char.py", [],
        {REFERENCE: [],
         "muon_cosine": [*MUON, "--muon_lr_scale=3"],  # 2000 iterations: equal iterations with the reference
         "muon_wsd": [*MUON, "--muon_lr_scale=5", *WSD, *SHORT],
         # config/train_shakespeare_char_muon.py's recipe: the best lever (bench/RESULTS.md)
         "muon_wsd_ns4_b24_375": QUICKSTART_LEVERS["muon_wsd_ns4_b24_375"]},
        QUICKSTART_LEVERS,
        {**{f"muon_cosine_x{s}": [*MUON, f"--muon_lr_scale={s}", *SHORT] for s in (1, 3)},
         **{f"muon_wsd_x{s}": [*MUON, f"--muon_lr_scale={s}", *WSD, *SHORT] for s in (1, 2, 3, 5)}}),
    # the larger CPU case: config/tiny_llama3.py (4L-6H-192D SwiGLU, RoPE, GQA; 8 x 128 tokens a step) on the
    # same data, with a nanoGPT-style AdamW schedule of its own (the preset has none): 1200 iterations
    "tiny_llama3": Case(
        "config/tiny_llama3.py",
        ["--learning_rate=1e-3", "--min_lr=1e-4", "--beta2=0.99", "--warmup_iters=100",
         *schedule(1200), "--eval_iters=10", "--compile=False"],
        {REFERENCE: [],
         "muon_wsd": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(600)]},
        {"muon_wsd_x3": [*MUON, "--muon_lr_scale=3", *WSD, *schedule(600)],
         "muon_wsd_x8": [*MUON, "--muon_lr_scale=8", *WSD, *schedule(600)],
         "muon_wsd_900": [*MUON, "--muon_lr_scale=5", *WSD, *schedule(900)]},
        {f"muon_wsd_x{s}": [*MUON, f"--muon_lr_scale={s}", *WSD, *schedule(600)] for s in (3, 5, 8)}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--case", default="quickstart", choices=list(CASES),
                   help="the model and its recipes (quickstart: config/train_shakespeare_char.py; tiny_llama3: "
                        "config/tiny_llama3.py on the same data)")
    p.add_argument("--dataset", default=os.path.join(ROOT, "data", "shakespeare_char"),
                   help="a prepared character-level dataset folder (train.bin, val.bin, meta.json)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe, run one after another")
    p.add_argument("--eval_interval", type=int, default=50, help="iterations between evaluations, every recipe")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (0: the machine's default)")
    p.add_argument("--recipes", help="comma-separated names of the case's recipes or levers (default: its "
                                     f"recipes; with --step_share {REFERENCE},muon_wsd)")
    p.add_argument("--keep_logs", metavar="DIR",
                   help="write each run's JSON run log to DIR/RECIPE_SEED/ and keep it (plots/compare_runs.py "
                        "--time overlays them); default: a temporary folder, deleted")
    p.add_argument("--serial", action="store_true",
                   help="one run at a time, each with the whole machine (a quiet machine's figure; use --threads 0)")
    p.add_argument("--target", type=float, metavar="LOSS",
                   help=f"the val loss to reach, instead of running {REFERENCE} for it (iterations to it only: "
                        "the time ratios need the reference beside)")
    p.add_argument("--sweep", action="store_true", help="the case's lr sweep (1 seed) instead")
    p.add_argument("--step_share", action="store_true", help="time the step's phases in this process instead")
    p.add_argument("--smoke", action="store_true", help="2 recipes x 1 seed of 20 iterations, evaluating every 10")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.eval_interval < 1 or a.threads < 0:
        p.error("--seeds and --eval_interval must be >= 1, --threads >= 0")
    case = CASES[a.case]
    known = {**case.recipes, **case.levers}
    names = a.recipes.split(",") if a.recipes else list(case.recipes if not a.step_share else (REFERENCE, "muon_wsd"))
    unknown = [r for r in names if r not in known]
    if unknown:
        p.error(f"unknown recipe {unknown[0]!r} in case {a.case}; choose from {', '.join(known)}")
    if REFERENCE not in names and not a.step_share and a.target is None:
        p.error(f"--recipes must include {REFERENCE} (its final val loss is the target), or give --target")
    a.chosen = {n: known[n] for n in names}
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.isfile(os.path.join(a.dataset, name)):
            p.error(f"no {name} in {a.dataset}; run python data/shakespeare_char/prepare.py first")
    if a.keep_logs and os.path.exists(a.keep_logs) and os.listdir(a.keep_logs):
        p.error(f"--keep_logs {a.keep_logs} is not empty; name a new folder (its runs' logs would mix with these)")
    return a


def start(name: str, overrides: list[str], seed: int, a: argparse.Namespace, out_dir: str) -> dict:
    """One run as a process of its own; returns its handle (read by finish())."""
    case = CASES[a.case]
    extra = ["--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=5", "--eval_iters=2"] if a.smoke else []
    # a recipe's own --eval_interval (more tokens per step: more often, at the same tokens seen) comes after ours
    cmd = [sys.executable, "-u", "train.py", case.config, *case.base, f"--eval_interval={a.eval_interval}",
           *overrides, *extra, f"--dataset={a.dataset}", f"--out_dir={out_dir}", f"--seed={seed}",
           "--save_checkpoint=False", "--device=cpu", "--log_interval=50", "--eval_tasks="]  # val loss only
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return {"name": name, "seed": seed, "proc": proc, "t0": t0, "evals": [], "cmd": cmd}


def finish(runs: list[dict]) -> list[dict]:
    """Read every run's stdout as it comes (one thread each), stamping each evaluation line with the seconds
    since its process started; the run's record once it exits."""
    import threading

    def read(run: dict) -> None:
        for line in run["proc"].stdout:
            if line.startswith("eval iter "):  # eval iter N: train loss X, val loss Y
                it = int(line.split()[2].rstrip(":"))
                run["evals"].append((it, float(line.rsplit(" ", 1)[1]), time.perf_counter() - run["t0"]))
        run["proc"].wait()
        run["wall_s"] = time.perf_counter() - run["t0"]

    threads = [threading.Thread(target=read, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = []
    for r in runs:
        if r["proc"].returncode != 0:
            last = (r["proc"].stderr.read().strip().splitlines() or ["no output"])[-1]
            raise errors.UserError(f"{r['name']} seed {r['seed']} failed ({last}); run its command to see why: "
                                   f"{' '.join(r['cmd'])}")
        records.append({"recipe": r["name"], "seed": r["seed"], "wall_s": round(r["wall_s"], 2),
                        "evals": [[it, loss, round(t, 2)] for it, loss, t in r["evals"]]})
    return records


def reach(record: dict, target: float) -> tuple[int | None, float | None]:
    """(iteration, seconds since the process started) of the first evaluation at or below target."""
    for it, loss, t in record["evals"]:
        if loss <= target:
            return it, t
    return None, None


def summarize(records: list[dict], target: float | None = None) -> tuple[float, list[dict]]:
    """The target (given, or the mean final val loss of REFERENCE) and one row per recipe, medians over seeds;
    the ratio columns only when REFERENCE ran."""
    ref = [r for r in records if r["recipe"] == REFERENCE]
    target = statistics.mean(r["evals"][-1][1] for r in ref) if target is None else target
    ref_wall = statistics.median(r["wall_s"] for r in ref) if ref else None
    ref_reach = statistics.median(reach(r, target)[1] or r["wall_s"] for r in ref) if ref else None
    rows = []
    for name in dict.fromkeys(r["recipe"] for r in records):
        mine = [r for r in records if r["recipe"] == name]
        hits = [reach(r, target) for r in mine]
        reached = [h for h in hits if h[0] is not None]
        row = {"recipe": name, "seeds": len(mine), "reached": len(reached),
               "final_iter": mine[0]["evals"][-1][0],
               "final_val_loss": round(statistics.median(r["evals"][-1][1] for r in mine), 4),
               "final_val_loss_per_seed": [round(r["evals"][-1][1], 4) for r in mine],
               "wall_s": round(statistics.median(r["wall_s"] for r in mine), 1)}
        if len(reached) == len(mine):  # a median only when every seed reached the target
            row["iters_to_target"] = statistics.median(h[0] for h in reached)
            row["s_to_target"] = round(statistics.median(h[1] for h in reached), 1)
            if ref:
                row["time_ratio_vs_reference"] = round(row["s_to_target"] / ref_reach, 3)
        if ref:
            row["wall_ratio_vs_reference"] = round(row["wall_s"] / ref_wall, 3)
        rows.append(row)
    return target, rows


def table(target: float, rows: list[dict], given: bool = False) -> str:
    """The summary as bench/RESULTS.md prints it (its ratio columns: this row's figure over the reference's)."""
    lines = [f"target val loss {target:.4f} ({'given' if given else f'mean final of {REFERENCE}'})",
             f"| recipe | iterations | final val loss | iters to target | s to target | ratio vs {REFERENCE} | "
             f"whole process s | ratio vs {REFERENCE} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['final_iter']} | {r['final_val_loss']:.4f} | "
                     f"{r.get('iters_to_target', 'not reached')} | {r.get('s_to_target', '-')} | "
                     f"{r.get('time_ratio_vs_reference', '-')} | {r['wall_s']} | "
                     f"{r.get('wall_ratio_vs_reference', '-')} |")
    return "\n".join(lines)


def step_share(case: Case, recipes: dict[str, list[str]], threads: int, steps: int = 30) -> list[dict]:
    """Milliseconds of forward+backward and of the optimizer step (loop.py's own phases) on the case's model,
    each recipe with its own batch and optimizer settings, the recipes taking turns every 10 steps in this
    process; medians over steps. step_ratio: a step's time over the first recipe's."""
    import torch

    import build
    import loop
    import optim
    import parallel
    import runlog
    from model import GPT

    if threads:
        torch.set_num_threads(threads)
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    loops, optimizers = {}, {}
    for name, overrides in recipes.items():
        tc, mc, _ = configurator.load_train([os.path.join(ROOT, case.config), *case.base, *overrides, "--device=cpu"])
        mc.vocab_size = 128  # the character dataset's 65, padded as train.py pads it
        x = torch.randint(0, 65, (tc.batch_size, tc.block_size))

        class Fixed:
            def next_batch(self, x: torch.Tensor = x) -> tuple[torch.Tensor, torch.Tensor]:
                return x, x

        torch.manual_seed(0)
        model = GPT(mc)
        muon = build.muon_settings(tc)
        opt = optim.build_optimizer(model, d, zero1=False, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2),
                                    weight_decay=tc.weight_decay, muon=muon)
        optimizers[name] = {"optimizer": tc.optimizer, "muon_ns_steps": tc.muon_ns_steps if muon else None,
                            "tokens_per_step": tc.batch_size * tc.block_size}
        loops[name] = loop.Loop(d, model, model, opt, Fixed(), runlog.RunLog("", False, {}), 1, steps,
                                lambda it, lr=tc.learning_rate: lr, lambda run, done: None, lambda run: None)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "opt": []} for n in loops}
    for block in range(len(loops) * steps // 10):
        name = list(loops)[block % len(loops)]
        for _ in range(10):
            t0 = time.perf_counter()
            loss, _ = loop.forward_backward(loops[name])
            t1 = time.perf_counter()
            loop.optimizer_step(loops[name], loss, 0)
            t2 = time.perf_counter()
            times[name]["fwd_bwd"].append(1000 * (t1 - t0))
            times[name]["opt"].append(1000 * (t2 - t1))
    out, first = [], None
    for name, t in times.items():
        fb, op = statistics.median(t["fwd_bwd"][2:]), statistics.median(t["opt"][2:])
        first = first or fb + op
        out.append({"recipe": name, **optimizers[name], "fwd_bwd_ms": round(fb, 2),
                    "optimizer_ms": round(op, 2), "optimizer_share": round(op / (fb + op), 3),
                    "step_ratio": round((fb + op) / first, 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    return errors.run_command(lambda: run(parse_args(argv)))


def run(a: argparse.Namespace) -> int:
    case = CASES[a.case]
    if a.step_share:
        for r in step_share(case, a.chosen, a.threads, steps=10 if a.smoke else 30):
            print(json.dumps(r), flush=True)
        return 0
    recipes = case.sweep if a.sweep else a.chosen
    if a.sweep:
        a.seeds = 1
    if a.smoke:
        a.seeds, a.eval_interval = 1, 10
        recipes = {REFERENCE: case.recipes[REFERENCE], "muon_wsd": case.recipes["muon_wsd"]}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = a.keep_logs or tmp
        for seed in range(1337, 1337 + a.seeds):  # seed-major: the recipes of a seed run side by side
            runs = [(name, over, seed, a, os.path.join(logs, f"{name}_{seed}")) for name, over in recipes.items()]
            batches = [[r] for r in runs] if a.serial else [runs]  # --serial: each run alone on the machine
            for batch in batches:
                for record in finish([start(*r) for r in batch]):
                    print(json.dumps(record), flush=True)
                    records.append(record)
    if a.sweep:
        print("| run | iters | final val loss |\n|---|---|---|")
        for r in records:
            print(f"| {r['recipe']} | {r['evals'][-1][0]} | {r['evals'][-1][1]:.4f} |")
        return 0
    target, rows = summarize(records, a.target)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(table(target, rows, a.target is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
