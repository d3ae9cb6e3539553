"""
Reading the JSON run logs that train.py writes (format: runlog.py) for the scripts in plots/.

A log can come from a run still in progress (the writer rewrites it atomically, so it is valid
JSON but may hold 0 or 1 records) and any of dt_ms, tokens_per_sec, mfu and memory_* may be null:
the first steps are untimed, MFU is null where the peak FLOP/s is unknown (CPU), GPU memory is
only measured on CUDA (memory_host_peak_gb, the host's peak RSS, is there on every device). Series drop null and non-finite values; callers say why a series is empty.

No torch and no train.py here: plotting a log needs neither. The plot scripts put the repository root
on sys.path for configurator (one-line errors), which imports no torch either.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import TYPE_CHECKING

from errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SMOOTHING = 0.9  # EMA factor per logged record: with log_interval 10, about the last 100 iterations


class RunLogError(UserError):
    """A file that cannot be read as a run log; the message is one line naming the file."""


def smoothing_factor(text: str) -> float:
    """argparse type for --smooth: an EMA factor in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1) (0: no smoothing)")
    return value


def load(path: str) -> dict:
    """The run log at path, with its record lists present (empty if the run has not logged any yet)."""
    if os.path.isdir(path):
        raise RunLogError(f"{path} is a directory; pass one of its run_*.json files")
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except FileNotFoundError:
        raise RunLogError(f"{path}: no such file") from None
    except OSError as e:
        raise RunLogError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RunLogError(f"{path} is not a JSON run log (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise RunLogError(f"{path} is not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(run, dict) or not isinstance(run.get("training_iterations"), list):
        raise RunLogError(f"{path} is not a run log (no training_iterations list; see runlog.py)")
    for key in ("training_iterations", "evaluations", "gradient_norms", "events"):
        records = run.setdefault(key, [])
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and isinstance(r.get("iter"), int) for r in records
        ):
            raise RunLogError(
                f"{path} is not a run log ({key} must be a list of records with an integer iter)"
            )
    if not all(isinstance(r.get("norms"), dict) for r in run["gradient_norms"]):
        raise RunLogError(f"{path} is not a run log (gradient_norms records need a norms object)")
    for key in ("config", "environment", "model"):
        if not isinstance(run.setdefault(key, {}), dict):
            raise RunLogError(f"{path} is not a run log ({key} is not an object)")
    run["path"] = path
    return run


def label(path: str) -> str:
    """A short name for a run: its folder and file stem, e.g. out-shakespeare-char/run_20250101_120000."""
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{folder}/{stem}" if folder else stem


def series(
    records: list[dict], key: str, x: str = "iter", scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """(xs, ys) of records where both fields are finite numbers; null, absent and NaN values are left out."""
    xs, ys = [], []
    for r in records:
        a, b = r.get(x), r.get(key)
        if is_number(a) and is_number(b):
            xs.append(a)
            ys.append(b * scale)
    return xs, ys


def is_number(v: object) -> bool:
    """A finite int or float (not a bool, None or NaN)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def ema(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased like Adam's moments so it starts at the first value, not at 0."""
    out, avg = [], 0.0
    for t, v in enumerate(values, start=1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**t) if factor > 0 else avg)
    return out


def speed_missing(run: dict) -> str:
    """Why a log has no dt_ms or tokens/s values: the first steps (compilation) are untimed."""
    return "no timed step logged yet" if run["training_iterations"] else "no training record logged yet"


def mfu_missing(run: dict) -> str:
    """Why a log has no MFU values: its mfu_note (e.g. CPU) or that no step was timed yet."""
    note = run["environment"].get("mfu_note")
    if run["environment"].get("peak_flops") is None and note:
        return note
    if not series(run["training_iterations"], "dt_ms")[0]:
        return speed_missing(run)
    return note or "MFU is null in this log"


def memory_missing(run: dict) -> str:
    """Why a log has no GPU memory values: train.py measures GPU memory on CUDA only."""
    device = str(run["environment"].get("device") or "")
    if device and not device.startswith("cuda"):
        return f"memory is only measured on CUDA; this run used {device}"
    if not run["training_iterations"]:
        return "no training record logged yet"
    return "memory is null in this log"


def tokens_per_iteration(run: dict) -> tuple[float | None, str]:
    """Tokens per optimizer step and where the figure came from: the config, else tokens_seen deltas."""
    tc = run["config"].get("train", {})
    keys = ("batch_size", "gradient_accumulation_steps", "block_size")
    if all(is_number(tc.get(k)) for k in keys):
        b, g, t = (tc[k] for k in keys)
        return float(b * g * t), f"config: {b} batch x {g} accumulation x {t} block"
    xs, tokens = series(run["training_iterations"], "tokens_seen")
    if len(xs) >= 2 and xs[-1] > xs[0]:
        return (tokens[-1] - tokens[0]) / (xs[-1] - xs[0]), "tokens_seen over the logged iterations"
    return None, "no config batch shape and fewer than two records with tokens_seen"


def image_path(text: str) -> str:
    """argparse type for --out: a file name whose extension matplotlib can write (png, pdf, svg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(text)[1].lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext not in supported:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no image extension; use one of {', '.join(sorted(supported))}"
        )
    return text


def save_figure(fig: Figure, out: str) -> None:
    """Write fig to out (format from the extension), creating its folder."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out)


def add_image_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """The --out and --smooth flags every plot script takes; out_default says where --out goes unset."""
    parser.add_argument("--out", type=image_path, metavar="PNG", help=f"image to write (default: {out_default})")
    parser.add_argument("--smooth", type=smoothing_factor, default=SMOOTHING, metavar="FACTOR",
                        help=f"EMA factor per logged record, 0 for none (default {SMOOTHING})")
