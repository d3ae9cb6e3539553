"""
Summarise a training run from its JSON run log: progress, losses, speed after warm-up, and how
long a token budget would take at that speed.

    python plots/analyze_run.py out-shakespeare-char/run_20250101_120000.json --tokens 85e9
    python plots/analyze_run.py out-shakespeare-char/run_*.json --tokens 85e9    # every log of the folder

Several logs: a resumed run writes one log per start (--init_from=resume), and those logs are parts
of one run. Logs of one folder are put in start order; a log written by a resume (or an --eval_only
evaluation) continues the run before it, any other log starts a run of its own. The parts of a run
are merged by iteration into one report (a "note" line lists them): where two parts cover the same
iterations (a resume from a checkpoint older than the last record), the later part's records are
kept. Each run gets one report, headed by its log's file name; reports are separated by a blank line.

Speed (time per iteration, tokens/s, MFU, memory) is the mean, min and max over the logged
training records after a warm-up skip. Each record's dt_ms is already the mean over its log
interval, so the mean here is the plain mean of the records. Warm-up: by default the first 10% of
records or the records of the first 50 logged iterations, whichever is fewer (--skip N skips
exactly N records); then records with null dt_ms (untimed steps) are left out.

Extrapolation: iterations = ceil(tokens / tokens per iteration), tokens per iteration from the
config (batch_size x gradient_accumulation_steps x block_size), else from tokens_seen deltas;
hours = iterations x mean time per iteration. Evaluation and checkpoint time is not in dt_ms.
In a merged run the warm-up is skipped in each part (each start compiles and warms up again), and
the header, config and tokens per iteration are the last part's.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: configurator

import runlogs  # noqa: E402  (plots/runlogs.py: a script's own folder is on sys.path, whatever the cwd)

import errors  # noqa: E402

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
    """Hours, with minutes for short spans and days for long ones."""
    if hours < 1:
        return f"{hours:.3f} hours ({hours * 60:.1f} minutes)"
    if hours < 48:
        return f"{hours:,.2f} hours"
    return f"{hours:,.2f} hours ({hours / 24:,.1f} days)"


def row(name: str, text: str) -> str:
    """One line of the summary: a 20-character name column, then the text."""
    return f"{name:20}{text}"


def progress_lines(run: dict) -> list[str]:
    """What the run is, and its latest iteration, loss and best val loss."""
    records, model, env = run["training_iterations"], run["model"], run["environment"]
    updated = f" (updated {run['updated_at'].replace('T', ' ')})" if run.get("updated_at") else ""
    lines = [row("run", f"{run['path']}{updated}")]
    if model.get("architecture"):
        size = f"{model.get('n_params', 0):,} parameters, {model.get('flops_per_token', 0):.4g} FLOPs/token"
        lines.append(row("model", f"{model['architecture']}: {size}"))
    if env.get("device"):
        sha = (env.get("git_sha") or "unknown")[:7] + (" (dirty)" if env.get("git_dirty") else "")
        dtype = str(env.get("dtype", "?")).removeprefix("torch.")
        device = f"{env.get('gpu_name') or env['device']} x {env.get('world_size', 1)}"
        lines.append(row("setup", f"{device}, {dtype}, torch {env.get('torch_version', '?')}, git {sha}"))
    if records:
        last, max_iters = records[-1], run["config"].get("train", {}).get("max_iters")
        of = f" of {max_iters}" if max_iters else ""
        seen = f", {last['tokens_seen']:,} tokens seen" if runlogs.is_number(last.get("tokens_seen")) else ""
        loss = f"{last['loss']:.4f}" if runlogs.is_number(last.get("loss")) else str(last.get("loss"))
        lines.append(row("latest", f"iter {last['iter']}{of}{seen}, loss {loss}"))
    else:
        lines.append(row("latest", "no training record logged yet"))
    scored = [r for r in run["evaluations"] if runlogs.is_number(r.get("val_loss"))]
    if scored:
        best, last = min(scored, key=lambda r: r["val_loss"]), scored[-1]
        latest = f"latest {last['val_loss']:.4f} at iter {last['iter']}; evaluations: {len(scored)}"
        lines.append(row("best val loss", f"{best['val_loss']:.4f} at iter {best['iter']} ({latest})"))
    else:
        lines.append(row("best val loss", "n/a (no evaluation logged yet)"))
    return lines


def speed_lines(run: dict, kept: list[dict], skips: list[int]) -> list[str]:
    """Mean, min and max of each speed field over the kept records, or why there is none. skips: the
    warm-up records skipped at the start of each part of the run (one part unless logs were merged)."""
    records = run["training_iterations"]
    if not records:
        return ["speed: n/a (no training record logged yet)"]
    parts = run.get("parts") or [(run["path"], records)]
    skipped = f"the first {' + '.join(map(str, skips))} of {len(records)} records"
    per_log = ", counted from the start of each log" if len(skips) > 1 else ""
    if not kept:
        return [f"speed: n/a (no timed record after skipping {skipped}{per_log}; the first steps are untimed)"]
    untimed = sum(len(part[n:]) for (_, part), n in zip(parts, skips)) - len(kept)
    lines = [
        f"speed over {len(kept)} timed records, iters {kept[0]['iter']} to {kept[-1]['iter']} "
        f"(skipped {skipped} as warm-up{per_log}, {untimed} untimed)",
        row("", f"{'mean':>16}{'min':>16}{'max':>16}"),
    ]
    missing = {
        "mfu": runlogs.mfu_missing(run),
        "memory_allocated_gb": runlogs.memory_missing(run),
        "memory_peak_gb": runlogs.memory_missing(run),
    }
    for key, name, scale, fmt in SPEED_ROWS:
        s = stats(kept, key, scale)
        if s is None:
            lines.append(row(name, f"n/a ({missing.get(key, 'null in this log')})"))
        else:
            lines.append(row(name, "".join(f"{fmt.format(v):>16}" for v in s)))
    return lines


def budget_lines(run: dict, kept: list[dict], tokens: float) -> list[str]:
    """Iterations and hours to train on tokens at this run's tokens per iteration and mean dt."""
    per_iter, source = runlogs.tokens_per_iteration(run)
    lines = [row("tokens/iteration", f"{per_iter:,.0f} ({source})" if per_iter else f"n/a ({source})")]
    dt = stats(kept, "dt_ms")
    budget = f"to {tokens:.4g} tokens"
    if per_iter and dt:
        iters, hours = extrapolate(tokens, per_iter, dt[0])
        lines.append(row(budget, f"{iters:,} iterations x {dt[0]:,.3f} ms = {duration(hours)}"))
    elif per_iter:
        lines.append(row(budget, "n/a (no timed record to take the time per iteration from)"))
    else:
        lines.append(row(budget, "n/a (no tokens per iteration)"))
    return lines


def continues(run: dict) -> bool:
    """Whether this log continues the run before it in its folder: written by --init_from=resume (an
    --eval_only evaluation of a checkpoint too). Without a recorded init_from, a log whose first record is
    past iteration 0 does."""
    init_from = run["config"].get("train", {}).get("init_from")
    if init_from is not None:
        return init_from == "resume"
    first = [r["iter"] for r in run["training_iterations"] + run["evaluations"]]
    return bool(first) and min(first) > 0


def group_runs(logs: list[dict]) -> list[list[dict]]:
    """The logs as runs, each a list of parts in start order: per folder (in the order the folders were
    given), a log that continues (see continues) joins the run before it; any other log starts a run."""
    folders: dict[str, list[dict]] = {}
    for run in logs:
        folders.setdefault(os.path.dirname(os.path.abspath(run["path"])), []).append(run)
    runs: list[list[dict]] = []
    for parts in folders.values():
        parts.sort(key=lambda r: (str(r.get("started_at") or ""), os.path.basename(r["path"])))
        start = len(runs)
        for run in parts:
            if len(runs) > start and continues(run):
                runs[-1].append(run)
            else:
                runs.append([run])
    return runs


def merge(parts: list[dict]) -> dict:
    """One run log from its parts in start order: each record list keeps, from each part's first iteration
    in that list on, that part's records (the later part wins where two overlap); events are concatenated.
    Header fields are the last part's; "parts" holds (path, that part's surviving training records)."""
    run = dict(parts[-1])
    for key in ("training_iterations", "evaluations", "gradient_norms"):
        merged: list[dict] = []
        for part in parts:
            if part[key]:
                start = part[key][0]["iter"]
                merged = [r for r in merged if r["iter"] < start] + list(part[key])
        run[key] = merged
    run["events"] = [e for part in parts for e in part["events"]]
    # each part's records that survived, in order: identity tells them apart after the merge
    owner = {id(r): i for i, part in enumerate(parts) for r in part["training_iterations"]}
    run["parts"] = [(part["path"], [r for r in run["training_iterations"] if owner[id(r)] == i])
                    for i, part in enumerate(parts)]
    return run


def merge_note(run: dict) -> list[str]:
    """The note line of a merged run: its parts and the iterations each contributes."""
    if len(run.get("parts", [])) < 2:
        return []
    spans = []
    for path, records in run["parts"]:
        span = f"iters {records[0]['iter']}-{records[-1]['iter']}" if records else "no training records"
        spans.append(f"{os.path.basename(path)} ({span})")
    return [row("note", f"{len(run['parts'])} logs of one resumed run, merged by iteration (a later log's "
                        f"records replace an earlier one's where both cover an iteration): {', '.join(spans)}")]


def report(run: dict, skip: int | None, tokens: float | None) -> list[str]:
    """The summary's lines: progress, speed after warm-up and, given a token budget, the extrapolation."""
    parts = run.get("parts") or [(run["path"], run["training_iterations"])]
    skips = [warmup_skip(records) if skip is None else skip for _, records in parts]
    kept = [r for (_, records), n in zip(parts, skips) for r in timed_records(records, n)]
    lines = [*progress_lines(run), *merge_note(run), "", *speed_lines(run, kept, skips)]
    if tokens is not None:
        lines += ["", *budget_lines(run, kept, tokens)]
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
    parser = errors.ArgumentParser(prog="analyze_run.py", description=__doc__)
    parser.add_argument("logs", nargs="+", metavar="RUN.json",
                        help="run logs (out_dir/run_*.json); the logs of a resumed run are merged into one report")
    parser.add_argument(
        "--tokens", type=_token_budget, metavar="N", help="token budget to extrapolate to, e.g. 85e9"
    )
    parser.add_argument(
        "--skip",
        type=_non_negative_int,
        metavar="N",
        help="warm-up records to skip, in each log (default: min(10%% of records, records of the first 50 iters))",
    )

    def body() -> int:
        args = parser.parse_args(argv)
        runs = group_runs([runlogs.load(path) for path in args.logs])
        reports = ["\n".join(report(merge(parts), args.skip, args.tokens)) for parts in runs]
        print("\n\n".join(reports))
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
