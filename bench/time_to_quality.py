"""
Time to quality on the quickstart: how soon each recipe reaches the val loss that nanoGPT's recipe (AdamW +
cosine, config/train_shakespeare_char.py as it is) ends at, in iterations and in whole-process wall time.

    python bench/time_to_quality.py                      # 3 seeds x every recipe (~30 min on a shared 2-core VM)
    python bench/time_to_quality.py --sweep              # the learning-rate sweep behind the recipes' lr scales
    python bench/time_to_quality.py --step_share         # the optimizer's share of a step, AdamW and Muon
    python bench/time_to_quality.py --smoke --dataset PATH   # seconds; what tests/test_bench.py runs

Each run is `python train.py config/train_shakespeare_char.py <the recipe's overrides> --seed=S` in a process
of its own, without checkpoints, evaluating every --eval_interval iterations (the same for every recipe, so
evaluation costs each the same per iteration). Its wall time is counted from the process's start (imports,
data, model build included) to the line that prints the evaluation, read from its stdout as it comes.
The target is the mean over seeds of the reference recipe's final val loss; a recipe reaches it at its
first evaluation at or below it.

Load: on a shared machine the recipes of one seed run at the same time, one process each with one thread
(--threads), and the seeds follow each other: every recipe meets the same load at the same moment. On a
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configurator  # noqa: E402
import errors  # noqa: E402

CONFIG = "config/train_shakespeare_char.py"
REFERENCE = "adamw_cosine"
# name -> train.py overrides on top of CONFIG; the lr scales come from the sweep (bench/RESULTS.md)
MUON = ["--optimizer=muon"]
WSD = ["--lr_schedule=wsd", "--lr_decay_fraction=0.3"]
SHORT = ["--max_iters=800", "--lr_decay_iters=800"]  # the schedule's length is part of the recipe
RECIPES = {
    REFERENCE: [],
    "muon_cosine": [*MUON, "--muon_lr_scale=3"],  # 2000 iterations: equal iterations with the reference
    "muon_wsd": [*MUON, "--muon_lr_scale=5", *WSD, *SHORT],
}
# the sweep: Muon's lr scale over the short schedule, judged by the val loss
SWEEP = {**{f"muon_cosine_x{s}": [*MUON, f"--muon_lr_scale={s}", *SHORT] for s in (1, 3)},
         **{f"muon_wsd_x{s}": [*MUON, f"--muon_lr_scale={s}", *WSD, *SHORT] for s in (1, 2, 3, 5)}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = errors.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--dataset", default=os.path.join(ROOT, "data", "shakespeare_char"),
                   help="a prepared character-level dataset folder (train.bin, val.bin, meta.json)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per recipe, run one after another")
    p.add_argument("--eval_interval", type=int, default=50, help="iterations between evaluations, every recipe")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (0: the machine's default)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    p.add_argument("--serial", action="store_true",
                   help="one run at a time, each with the whole machine (a quiet machine's figure; use --threads 0)")
    p.add_argument("--sweep", action="store_true", help="the lr sweep (SWEEP, 800 iterations, 1 seed) instead")
    p.add_argument("--step_share", action="store_true", help="time the step's phases in this process instead")
    p.add_argument("--smoke", action="store_true", help="2 recipes x 1 seed of 20 iterations, evaluating every 10")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.eval_interval < 1 or a.threads < 0:
        p.error("--seeds and --eval_interval must be >= 1, --threads >= 0")
    unknown = [r for r in a.recipes.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.isfile(os.path.join(a.dataset, name)):
            p.error(f"no {name} in {a.dataset}; run python data/shakespeare_char/prepare.py first")
    return a


def start(name: str, overrides: list[str], seed: int, a: argparse.Namespace, out_dir: str) -> dict:
    """One run as a process of its own; returns its handle (read by finish())."""
    extra = ["--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=5", "--eval_iters=2"] if a.smoke else []
    cmd = [sys.executable, "-u", "train.py", CONFIG, *overrides, *extra, f"--dataset={a.dataset}",
           f"--out_dir={out_dir}", f"--seed={seed}", f"--eval_interval={a.eval_interval}", "--save_checkpoint=False",
           "--device=cpu", "--log_interval=50", "--eval_tasks="]  # val loss only: no task scoring
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


def summarize(records: list[dict]) -> tuple[float, list[dict]]:
    """The target (mean final val loss of REFERENCE) and one row per recipe, medians over seeds."""
    ref = [r["evals"][-1][1] for r in records if r["recipe"] == REFERENCE]
    target = statistics.mean(ref)
    ref_wall = statistics.median(r["wall_s"] for r in records if r["recipe"] == REFERENCE)
    ref_reach = statistics.median(reach(r, target)[1] or r["wall_s"] for r in records if r["recipe"] == REFERENCE)
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
            row["time_ratio_vs_reference"] = round(row["s_to_target"] / ref_reach, 3)
        row["wall_ratio_vs_reference"] = round(row["wall_s"] / ref_wall, 3)
        rows.append(row)
    return target, rows


def table(target: float, rows: list[dict]) -> str:
    """The summary as bench/RESULTS.md prints it (its ratio columns: this row's figure over the reference's)."""
    lines = [f"target val loss {target:.4f} (mean final of {REFERENCE})",
             f"| recipe | iterations | final val loss | iters to target | s to target | ratio vs {REFERENCE} | "
             f"whole process s | ratio vs {REFERENCE} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['final_iter']} | {r['final_val_loss']:.4f} | "
                     f"{r.get('iters_to_target', 'not reached')} | {r.get('s_to_target', '-')} | "
                     f"{r.get('time_ratio_vs_reference', '-')} | {r['wall_s']} | {r['wall_ratio_vs_reference']} |")
    return "\n".join(lines)


def step_share(threads: int, steps: int = 30) -> list[dict]:
    """Milliseconds of forward+backward and of the optimizer step (loop.py's own phases) on the quickstart's
    model and batch, AdamW and Muon alternating every 10 steps in this process; median over steps."""
    import torch

    import loop
    import optim
    import parallel
    import runlog
    from model import GPT

    if threads:
        torch.set_num_threads(threads)
    tc, mc, _ = configurator.load_train([CONFIG, "--device=cpu"])
    mc.vocab_size = 128
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    x = torch.randint(0, 65, (tc.batch_size, tc.block_size))

    class Fixed:
        def next_batch(self):
            return x, x

    loops = {}
    for name, muon in (("adamw", None), ("muon", optim.MuonSettings())):
        torch.manual_seed(0)
        model = GPT(mc)
        opt = optim.build_optimizer(model, d, zero1=False, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, muon=muon)
        loops[name] = loop.Loop(d, model, model, opt, Fixed(), runlog.RunLog("", False, {}), 1, steps,
                                lambda it: 1e-3, lambda run, done: None, lambda run: None)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd_bwd": [], "opt": []} for n in loops}
    for block in range(2 * steps // 10):
        name = list(loops)[block % 2]
        for _ in range(10):
            t0 = time.perf_counter()
            loss, _ = loop.forward_backward(loops[name])
            t1 = time.perf_counter()
            loop.optimizer_step(loops[name], loss, 0)
            t2 = time.perf_counter()
            times[name]["fwd_bwd"].append(1000 * (t1 - t0))
            times[name]["opt"].append(1000 * (t2 - t1))
    out = []
    for name, t in times.items():
        fb, op = statistics.median(t["fwd_bwd"][2:]), statistics.median(t["opt"][2:])
        out.append({"optimizer": name, "fwd_bwd_ms": round(fb, 2), "optimizer_ms": round(op, 2),
                    "optimizer_share": round(op / (fb + op), 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    return errors.run_command(lambda: run(parse_args(argv)))


def run(a: argparse.Namespace) -> int:
    if a.step_share:
        for r in step_share(a.threads, steps=10 if a.smoke else 30):
            print(json.dumps(r), flush=True)
        return 0
    if a.sweep:
        a.seeds, recipes = 1, SWEEP
    else:
        recipes = {n: RECIPES[n] for n in a.recipes.split(",")}
    if a.smoke:
        a.seeds, a.eval_interval = 1, 10
        recipes = {REFERENCE: RECIPES[REFERENCE], "muon_wsd": RECIPES["muon_wsd"]}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.seeds):  # seed-major: the recipes of a seed run side by side
            runs = [(name, over, 1337 + seed, a, os.path.join(tmp, f"{name}_{seed}")) for name, over in recipes.items()]
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
    target, rows = summarize(records)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(table(target, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
