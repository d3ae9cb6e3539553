"""
Compare training runs: their JSON run logs overlaid, one colour per run, in one PNG with the loss
against iterations and against tokens seen (or wall time, --time), tokens/s and MFU.

    python plots/compare_runs.py out-a/run_1.json out-b/run_2.json --labels llama3,qwen3 --out cmp.png
    python plots/compare_runs.py out-a/run_1.json out-b/run_2.json --time    # loss against seconds

Loss panels draw each run's training loss raw (faint) with its EMA (--smooth, per logged record;
default 0.9) and its val loss at evaluations (dashed, markers). --time puts the records' elapsed_s
(wall seconds since each run's log opened, evaluations included; runlog.py) on the second panel's x axis
instead of tokens, so a recipe with dearer steps is set against time. The default output is
compare_runs.png next to the first log.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: configurator

import plot_single_run as single  # noqa: E402  the panels of one run, drawn here for several
import runlogs  # noqa: E402  (plots/runlogs.py: a script's own folder is on sys.path, whatever the cwd)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

import errors  # noqa: E402

TIME_MISSING = "no elapsed_s in these logs (written before run logs recorded wall time)"


def panel_loss(ax: Axes, runs: list[dict], colors: list[str], x: str, smooth: float,
               missing: str = "no training record or evaluation logged yet") -> None:
    """Training loss (raw and EMA) and val loss of each run against x: 'iter', 'tokens_seen' or 'elapsed_s';
    missing: the note of a panel with nothing to draw."""
    drawn = False
    for run, color in zip(runs, colors):
        xs, ys = runlogs.series(run["training_iterations"], "loss", x=x)
        if xs:
            single.draw_smoothed(ax, xs, ys, color, None, smooth)
        vx, vy = runlogs.series(run["evaluations"], "val_loss", x=x)  # eval_only logs have no tokens_seen
        ax.plot(vx, vy, "o--", color=color, markersize=4)
        drawn = drawn or bool(xs or vx)
    if drawn:
        ax.legend(
            handles=[
                Line2D([], [], color="0.3", label="train loss (per step, EMA)"),
                Line2D(
                    [], [], color="0.3", linestyle="--", marker="o", markersize=4, label="val loss (eval)"
                ),
            ],
            fontsize=8,
        )
    else:
        single.no_data(ax, missing)
    ax.set_ylabel("cross-entropy (nats/token)")


def plot_comparison(runs: list[dict], labels: list[str], smooth: float = runlogs.SMOOTHING,
                    time: bool = False) -> Figure:
    """Four panels: loss against iterations and tokens (time: wall seconds), tokens/s and MFU against iterations."""
    colors = [f"C{i % 10}" for i in range(len(runs))]
    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    (loss_it, loss_tok), (speed, mfu) = fig.subplots(2, 2)
    speed.sharex(loss_it)  # an empty panel spans the same iterations as the others
    mfu.sharex(loss_it)
    panel_loss(loss_it, runs, colors, "iter", smooth)
    loss_it.set_title("Loss against iterations")
    loss_it.set_xlabel("iteration")
    if time:
        records = any(r["training_iterations"] or r["evaluations"] for r in runs)
        panel_loss(loss_tok, runs, colors, "elapsed_s", smooth,
                   TIME_MISSING if records else "no training record or evaluation logged yet")
        loss_tok.set_title("Loss against wall time")
        loss_tok.set_xlabel("seconds since the run log opened")
    else:
        panel_loss(loss_tok, runs, colors, "tokens_seen", smooth)
        loss_tok.set_title("Loss against tokens")
        loss_tok.set_xlabel("tokens seen")
        loss_tok.xaxis.set_major_formatter(EngFormatter())  # 500 k, 1.5 M, 2 G
    if single.panel_series(speed, runs, colors, "tokens_per_sec", 1.0, smooth, runlogs.speed_missing):
        speed.yaxis.set_major_formatter(EngFormatter())
    speed.set_title("Throughput")
    speed.set_ylabel("tokens/s")
    speed.set_xlabel("iteration")
    single.panel_series(mfu, runs, colors, "mfu", 100.0, smooth, runlogs.mfu_missing)
    mfu.set_title("Model FLOPs utilisation")
    mfu.set_ylabel("MFU (%)")
    mfu.set_xlabel("iteration")
    for ax in (loss_it, loss_tok, speed, mfu):
        ax.grid(True, alpha=0.3)
    handles = [
        Line2D([], [], color=c, linewidth=1.8, label=single.title(run, name))
        for run, name, c in zip(runs, labels, colors)
    ]
    fig.legend(
        handles=handles,
        loc="outside upper center",
        fontsize=8,
        title=f"faint: raw logged values; solid: their EMA, factor {smooth:g} per logged record",
        title_fontsize=9,
    )
    return fig


def main(argv: list[str]) -> int:
    parser = errors.ArgumentParser(prog="compare_runs.py", description=__doc__)
    parser.add_argument("logs", nargs="+", metavar="RUN.json", help="run logs to overlay")
    parser.add_argument(
        "--labels",
        metavar="A,B,...",
        help="comma-separated names, one per log (default: folder/file of each)",
    )
    parser.add_argument("--time", action="store_true",
                        help="loss against wall time (the records' elapsed_s) instead of against tokens")
    runlogs.add_image_args(parser, out_default="compare_runs.png next to the first log")

    def body() -> int:
        args = parser.parse_args(argv)
        labels = [runlogs.label(path) for path in args.logs]
        if args.labels is not None:
            labels = [name.strip() for name in args.labels.split(",")]
            if len(labels) != len(args.logs) or not all(labels):
                parser.error(
                    f"--labels has {len(labels)} names for {len(args.logs)} logs; give one non-empty name each"
                )
        out = args.out or os.path.join(os.path.dirname(args.logs[0]), "compare_runs.png")
        runs = [runlogs.load(path) for path in args.logs]
        runlogs.save_figure(plot_comparison(runs, labels, args.smooth, args.time), out)
        print(f"wrote {out}")
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
