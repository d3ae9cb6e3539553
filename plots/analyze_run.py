"""
Summarise a training run from its JSON run log: progress, losses, speed after warm-up, and how
long a token budget would take at that speed.

    python plots/analyze_run.py out-shakespeare-char/run_20250101_120000.json --tokens 85e9

Speed (time per iteration, tokens/s, MFU, memory) is the mean, min and max over the logged
training records after a warm-up skip. Each record's dt_ms is already the mean over its log
interval, so the mean here is the plain mean of the records. Warm-up: by default the first 10% of
records or the records of the first 50 logged iterations, whichever is fewer (--skip N skips
exactly N records); then records with null dt_ms (untimed steps) are left out.

Extrapolation: iterations = ceil(tokens / tokens per iteration), tokens per iteration from the
config (batch_size x gradient_accumulation_steps x block_size), else from tokens_seen deltas;
hours = iterations x mean time per iteration. Evaluation and checkpoint time is not in dt_ms.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import runlogs  # plots/runlogs.py: Python puts the script's own folder on sys.path, whatever the cwd

WARMUP_FRACTION = 0.1  # of the records
WARMUP_ITERS = 50  # logged iterations, counted from the first record (a resumed run warms up again)

# (record field, row name, scale, format of one value)
SPEED_ROWS = [
    ("dt_ms", "time per iteration", 1.0, "{:,.3f} ms"),
    ("tokens_per_sec", "tokens/s", 1.0, "{:,.0f}"),
    ("mfu", "MFU", 100.0, "{:.2f}%"),
    ("memory_allocated_gb", "memory allocated", 1.0, "{:.3f} GiB"),
    ("memory_peak_gb", "memory peak", 1.0, "{:.3f} GiB"),
]


def warmup_skip(records: list[dict]) -> int:
    """Default warm-up: the first 10% of records or those of the first 50 iterations, whichever is fewer."""
    if not records:
        return 0
    first = records[0]["iter"]
    early = sum(1 for r in records if r["iter"] < first + WARMUP_ITERS)
    return min(int(len(records) * WARMUP_FRACTION), early)


def timed_records(records: list[dict], skip: int) -> list[dict]:
    """The records after the first skip whose step was timed (dt_ms not null)."""
    return [r for r in records[skip:] if runlogs.is_number(r.get("dt_ms"))]


def stats(records: list[dict], key: str, scale: float = 1.0) -> tuple[float, float, float] | None:
    """(mean, min, max) of a field over records, leaving nulls out; None if there is no value."""
    _, values = runlogs.series(records, key, scale=scale)
    if not values:
        return None
    return statistics.fmean(values), min(values), max(values)


def extrapolate(tokens: float, tokens_per_iter: float, ms_per_iter: float) -> tuple[int, float]:
    """(iterations, hours) to train on tokens at tokens_per_iter per step and ms_per_iter per step."""
    iters = math.ceil(tokens / tokens_per_iter)
    return iters, iters * ms_per_iter / 1000 / 3600


def duration(hours: float) -> str:
    if hours < 1:
        return f"{hours:.3f} hours ({hours * 60:.1f} minutes)"
    if hours < 48:
        return f"{hours:,.2f} hours"
    return f"{hours:,.2f} hours ({hours / 24:,.1f} days)"


def report(run: dict, skip: int | None, tokens: float | None) -> list[str]:
    """The summary's lines."""
    records, evals = run["training_iterations"], run["evaluations"]
    model, env = run["model"], run["environment"]
    max_iters = run["config"].get("train", {}).get("max_iters")
    updated = f" (updated {run['updated_at'].replace('T', ' ')})" if run.get("updated_at") else ""
    lines = [f"run                 {run['path']}{updated}"]
    if model.get("architecture"):
        lines.append(f"model               {model['architecture']}: {model.get('n_params', 0):,} parameters, "
                     f"{model.get('flops_per_token', 0):.4g} FLOPs/token")
    if env.get("device"):
        sha = (env.get("git_sha") or "unknown")[:7] + (" (dirty)" if env.get("git_dirty") else "")
        lines.append(f"setup               {env.get('gpu_name') or env['device']} x {env.get('world_size', 1)}, "
                     f"{str(env.get('dtype', '?')).removeprefix('torch.')}, torch {env.get('torch_version', '?')}, "
                     f"git {sha}")
    if records:
        last = records[-1]
        seen = f", {last['tokens_seen']:,} tokens seen" if runlogs.is_number(last.get("tokens_seen")) else ""
        of = f" of {max_iters}" if max_iters else ""
        loss = f"{last['loss']:.4f}" if runlogs.is_number(last.get("loss")) else str(last.get("loss"))
        lines.append(f"latest              iter {last['iter']}{of}{seen}, loss {loss}")
    else:
        lines.append("latest              no training record logged yet")
    scored = [r for r in evals if runlogs.is_number(r.get("val_loss"))]
    if scored:
        best = min(scored, key=lambda r: r["val_loss"])
        lines.append(f"best val loss       {best['val_loss']:.4f} at iter {best['iter']} "
                     f"(latest {scored[-1]['val_loss']:.4f} at iter {scored[-1]['iter']}; evaluations: {len(scored)})")
    else:
        lines.append("best val loss       n/a (no evaluation logged yet)")

    skip = warmup_skip(records) if skip is None else skip
    kept = timed_records(records, skip)
    untimed = len(records[skip:]) - len(kept)
    lines.append("")
    if kept:
        lines.append(f"speed over {len(kept)} timed records, iters {kept[0]['iter']} to {kept[-1]['iter']} "
                     f"(skipped the first {skip} of {len(records)} records as warm-up, {untimed} untimed)")
        lines.append(f"{'':20}{'mean':>16}{'min':>16}{'max':>16}")
    elif not records:
        lines.append("speed: n/a (no training record logged yet)")
    else:
        lines.append(f"speed: n/a (no timed record after skipping the first {skip} of {len(records)} records; "
                     "the first steps are untimed)")
    missing = {"mfu": runlogs.mfu_missing(run), "memory_allocated_gb": runlogs.memory_missing(run),
               "memory_peak_gb": runlogs.memory_missing(run)}
    for key, name, scale, fmt in SPEED_ROWS if kept else []:
        s = stats(kept, key, scale)
        if s is None:
            lines.append(f"{name:20}n/a ({missing.get(key, 'null in this log')})")
        else:
            lines.append(f"{name:20}" + "".join(f"{fmt.format(v):>16}" for v in s))

    if tokens is not None:
        per_iter, source = runlogs.tokens_per_iteration(run)
        lines.append("")
        lines.append(f"tokens/iteration    {per_iter:,.0f} ({source})" if per_iter else
                     f"tokens/iteration    n/a ({source})")
        dt = stats(kept, "dt_ms")
        budget = f"to {tokens:.4g} tokens"
        if per_iter and dt:
            iters, hours = extrapolate(tokens, per_iter, dt[0])
            lines.append(f"{budget:20}{iters:,} iterations x {dt[0]:,.3f} ms = {duration(hours)}")
        else:
            why = "no timed record to take the time per iteration from" if per_iter else "no tokens per iteration"
            lines.append(f"{budget:20}n/a ({why})")
    return lines


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _token_budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 85e9)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of tokens")
    return value


def main(argv: list[str]) -> int:
    parser = runlogs.ArgumentParser(prog="analyze_run.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("log", metavar="RUN.json", help="a run log (out_dir/run_*.json)")
    parser.add_argument("--tokens", type=_token_budget, help="token budget to extrapolate to, e.g. 85e9")
    parser.add_argument("--skip", type=_non_negative_int,
                        help="warm-up records to skip (default: min(10%% of records, records of the first 50 iters))")
    args = parser.parse_args(argv)
    try:
        run = runlogs.load(args.log)
    except runlogs.RunLogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(run, args.skip, args.tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
