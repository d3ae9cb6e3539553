"""
Plot a training run from its JSON run log: loss (train and val), learning rate, tokens/s, MFU,
memory, gradient norm and, when the run scored eval_tasks, downstream task accuracy against
iteration, one PNG with a panel each.

    python plots/plot_single_run.py out-shakespeare-char/run_20250101_120000.json
    cd plots && python plot_single_run.py ../saves/run_*.json --out runs.png

Several logs (e.g. the two logs of a resumed run) are overlaid on the same panels, one colour per
log. Noisy series are drawn raw and faint, with an EMA over them (--smooth, per logged record;
default 0.9). A panel with no values says why ("no data (...)") instead of disappearing. The
default output is next to the first log: run_X.png, or run_X_overlay.png for several logs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the root: configurator

import matplotlib  # noqa: E402
import runlogs  # noqa: E402  (plots/runlogs.py: a script's own folder is on sys.path, whatever the cwd)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402

import errors  # noqa: E402


def draw_smoothed(
    ax: Axes, xs: list[float], ys: list[float], color: str, label: str | None, smooth: float
) -> None:
    """The raw points, faint, and their EMA on top (the only one labelled)."""
    few = len(xs) < 50  # markers keep a run of 1 or 2 records visible
    ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8, marker="." if few else None)
    ax.plot(
        xs,
        runlogs.ema(ys, smooth),
        color=color,
        linewidth=1.8,
        label=label,
        marker="o" if len(xs) == 1 else None,
    )


def no_data(ax: Axes, why: str) -> None:
    """A note in the middle of an empty panel saying why it is empty."""
    note = dict(ha="center", va="center", wrap=True, fontsize=9, color="0.4")
    ax.text(0.5, 0.5, f"no data\n({why})", transform=ax.transAxes, **note)
    ax.set_yticks([])  # an empty axis's 0..1 scale would read as values


def panel_loss(ax: Axes, runs: list[dict], colors: list[str], smooth: float) -> None:
    """Per-step training loss (raw and EMA) and the train and val loss of each evaluation."""
    one = len(runs) == 1
    for run, color in zip(runs, colors):
        xs, ys = runlogs.series(run["training_iterations"], "loss")
        draw_smoothed(ax, xs, ys, color, "train loss (per step, EMA)" if one and xs else None, smooth)
        xs, ys = runlogs.series(run["evaluations"], "val_loss")
        ax.plot(
            xs,
            ys,
            "o--",
            color="C1" if one else color,
            markersize=4,
            label="val loss (eval)" if one and xs else None,
        )
        xs, ys = runlogs.series(run["evaluations"], "train_loss")
        ax.plot(
            xs,
            ys,
            "s:",
            color="C2" if one else color,
            markersize=3,
            label="train loss (eval)" if one and xs else None,
        )
    if not one:  # colours name the runs (figure legend); line styles name the series
        ax.legend(
            handles=[
                Line2D([], [], color="0.3", label="train loss (per step, EMA)"),
                Line2D(
                    [], [], color="0.3", linestyle="--", marker="o", markersize=4, label="val loss (eval)"
                ),
                Line2D(
                    [], [], color="0.3", linestyle=":", marker="s", markersize=3, label="train loss (eval)"
                ),
            ],
            fontsize=8,
        )
    if not any(run["training_iterations"] or run["evaluations"] for run in runs):
        no_data(ax, "no training record or evaluation logged yet")
    elif one:
        ax.legend(fontsize=8)
    ax.set_title("Loss")
    ax.set_ylabel("cross-entropy (nats/token)")


def panel_series(
    ax: Axes,
    runs: list[dict],
    colors: list[str],
    key: str,
    scale: float,
    smooth: float,
    why_missing: Callable[[dict], str],
    x: str = "iter",
) -> bool:
    """One smoothed series per run; a 'no data' note (why_missing(first run)) when no run has a value."""
    drawn = False
    for run, color in zip(runs, colors):
        xs, ys = runlogs.series(run["training_iterations"], key, x=x, scale=scale)
        if xs:
            draw_smoothed(ax, xs, ys, color, None, smooth)
            drawn = True
    if not drawn:
        no_data(ax, why_missing(runs[0]))
    return drawn


def panel_lr(ax: Axes, runs: list[dict], colors: list[str]) -> None:
    """The learning rate of each logged step."""
    for run, color in zip(runs, colors):
        xs, ys = runlogs.series(run["training_iterations"], "lr")
        ax.plot(xs, ys, color=color, marker="." if len(xs) < 50 else None)  # exact values: nothing to smooth
    if not any(run["training_iterations"] for run in runs):
        no_data(ax, "no training record logged yet")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")


MEMORY_TITLE = "Memory"  # the legend says which: GPU allocated, GPU peak, host peak RSS


def panel_memory(ax: Axes, runs: list[dict], colors: list[str]) -> None:
    """GPU allocated memory (solid) and its peak (dashed), and the host memory, the process's peak
    RSS (dotted, every device, so CPU runs have a figure too), in GiB."""
    drawn = False
    series = (("memory_allocated_gb", "-", "GPU allocated"), ("memory_peak_gb", "--", "GPU peak"),
              ("memory_host_peak_gb", ":", "host memory (peak RSS)"))
    for run, color in zip(runs, colors):
        for key, style, name in series:
            xs, ys = runlogs.series(run["training_iterations"], key)
            if xs:
                ax.plot(xs, ys, style, color=color, label=name if color == colors[0] else None)
                drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)  # from zero: a flat 0.38 GiB must not look like a climb
    else:
        no_data(ax, runlogs.memory_missing(runs[0]))
    ax.set_title(MEMORY_TITLE)
    ax.set_ylabel("GiB")


def panel_grad_norm(ax: Axes, runs: list[dict], colors: list[str], smooth: float) -> None:
    """The global gradient norm before clipping, with each run's grad_clip threshold."""
    panel_series(ax, runs, colors, "grad_norm", 1.0, smooth, lambda run: "no training record logged yet")
    clips = {run["config"].get("train", {}).get("grad_clip") for run in runs} - {None, 0}
    for clip in sorted(clips):
        ax.axhline(clip, color="0.5", linestyle="--", linewidth=0.8, label=f"grad_clip = {clip:g}")
    if clips:
        ax.legend(fontsize=8)
    ax.set_title("Gradient norm (global, before clipping)")
    ax.set_ylabel("L2 norm")


def panel_module_norms(ax: Axes, run: dict) -> None:
    """Per-module gradient norms (gradient_log_interval > 0), one line per module, of one run."""
    modules = list(dict.fromkeys(m for r in run["gradient_norms"] for m in r["norms"]))
    cmap = matplotlib.colormaps["viridis"]
    for i, module in enumerate(modules):
        points = [
            (r["iter"], r["norms"][module])
            for r in run["gradient_norms"]
            if runlogs.is_number(r["norms"].get(module))
        ]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        ax.plot(xs, ys, color=cmap(i / max(1, len(modules) - 1)), linewidth=1.0, label=module)
    ax.set_yscale("log")  # embeddings and deep blocks differ by orders of magnitude
    ax.legend(fontsize=6, ncol=2 if len(modules) > 8 else 1)
    ax.set_title(f"Gradient norm by module ({runlogs.label(run['path'])})")
    ax.set_ylabel("L2 norm")


def panel_tasks(ax: Axes, runs: list[dict], colors: list[str]) -> None:
    """Downstream task accuracy at each evaluation (eval_tasks, evals.py): each task's core metric (acc or
    acc_norm), one line style per task, and its chance level dotted."""
    names = list(dict.fromkeys(n for run in runs for r in run["evaluations"] for n in r.get("tasks") or {}))
    styles = ["-", "--", "-.", ":"]
    chance = {}
    for run, color in zip(runs, colors):
        for i, name in enumerate(names):
            points = [(r["iter"], r["tasks"][name]) for r in run["evaluations"] if name in (r.get("tasks") or {})]
            if not points:
                continue
            metric = points[-1][1].get("core_metric", "acc")
            xs = [x for x, t in points if runlogs.is_number(t.get(metric))]
            ys = [100 * t[metric] for _, t in points if runlogs.is_number(t.get(metric))]
            ax.plot(xs, ys, styles[i % len(styles)], color=color if len(runs) > 1 else f"C{i % 10}", marker="o",
                    markersize=3, label=f"{name} ({metric})" if color == colors[0] else None)
            if runlogs.is_number(points[-1][1].get("random_baseline")):
                chance[name] = 100 * points[-1][1]["random_baseline"]
    for i, (name, level) in enumerate(chance.items()):
        ax.axhline(level, color="0.5" if len(runs) > 1 else f"C{names.index(name) % 10}", linestyle=":",
                   linewidth=0.8, label=f"{name} chance ({level:.0f}%)" if i < 4 else None)
    ax.legend(fontsize=8)
    ax.set_title("Downstream tasks")
    ax.set_ylabel("accuracy (%)")


def title(run: dict, name: str | None = None) -> str:
    """What the run is (name: default its folder and file) and how far it got."""
    model, env = run["model"], run["environment"]
    max_iters = run["config"].get("train", {}).get("max_iters")
    parts = [name or runlogs.label(run["path"])]
    if model.get("architecture"):
        parts.append(f"{model['architecture']}, {model.get('n_params', 0) / 1e6:.2f}M parameters")
    if env.get("device"):
        parts.append(f"{env.get('gpu_name') or env['device']} x {env.get('world_size', 1)}")
    records = run["training_iterations"]
    progress = f"iter {records[-1]['iter']}" if records else "no training record yet"
    if max_iters:
        progress += f" of {max_iters}" if records else f" (max_iters {max_iters})"
    if run.get("updated_at"):
        progress += f", updated {run['updated_at'].replace('T', ' ')}"
    parts.append(progress)
    return "; ".join(parts)


def plot_runs(runs: list[dict], smooth: float = runlogs.SMOOTHING) -> Figure:
    """One figure with a panel per quantity; several runs are overlaid, one colour each."""
    colors = [f"C{i % 10}" for i in range(len(runs))]
    with_modules = [run for run in runs if run["gradient_norms"]]
    with_tasks = any(r.get("tasks") for run in runs for r in run["evaluations"])
    n_panels = 6 + (1 if with_modules else 0) + (1 if with_tasks else 0)
    rows = (n_panels + 1) // 2
    fig = Figure(figsize=(12, 3.3 * rows + 0.6), dpi=100, layout="constrained")
    # shared x: a panel with no data still spans the iterations of the others
    axes = fig.subplots(rows, 2, squeeze=False, sharex="all").flatten()
    panel_loss(axes[0], runs, colors, smooth)
    panel_lr(axes[1], runs, colors)
    if panel_series(axes[2], runs, colors, "tokens_per_sec", 1.0, smooth, runlogs.speed_missing):
        axes[2].yaxis.set_major_formatter(EngFormatter())  # 20 k, 1.2 M
    axes[2].set_title("Throughput")
    axes[2].set_ylabel("tokens/s")
    panel_series(axes[3], runs, colors, "mfu", 100.0, smooth, runlogs.mfu_missing)
    axes[3].set_title("Model FLOPs utilisation")
    axes[3].set_ylabel("MFU (%)")
    panel_memory(axes[4], runs, colors)
    panel_grad_norm(axes[5], runs, colors, smooth)
    if with_tasks:
        panel_tasks(axes[6], runs, colors)
    if with_modules:
        panel_module_norms(axes[6 + with_tasks], with_modules[0])
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    iters = [r["iter"] for run in runs for key in ("training_iterations", "evaluations") for r in run[key]]
    if not iters:  # nothing logged yet: show the planned iterations
        axes[0].set_xlim(0, max(run["config"].get("train", {}).get("max_iters") or 1 for run in runs))
    elif max(iters) - min(iters) < 2:  # one iteration: keep the axis from zooming into fractions
        axes[0].set_xlim(min(iters) - 1, max(iters) + 1)
    for ax in axes[:n_panels]:
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides them on inner rows
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    smoothing = f"faint: raw logged values; solid: their EMA, factor {smooth:g} per logged record"
    if len(runs) == 1:
        fig.suptitle(f"{title(runs[0])}\n{smoothing}", fontsize=10)
    else:
        handles = [Line2D([], [], color=c, linewidth=1.8, label=title(run)) for run, c in zip(runs, colors)]
        fig.legend(handles=handles, loc="outside upper center", fontsize=8, title=smoothing, title_fontsize=9)
    return fig


def default_out(paths: list[str]) -> str:
    """Next to the first log: run_X.png, or run_X_overlay.png for several logs."""
    stem = os.path.splitext(paths[0])[0]
    return f"{stem}.png" if len(paths) == 1 else f"{stem}_overlay.png"


def main(argv: list[str]) -> int:
    parser = errors.ArgumentParser(prog="plot_single_run.py", description=__doc__)
    parser.add_argument("logs", nargs="+", metavar="RUN.json", help="run logs (several: overlaid)")
    runlogs.add_image_args(parser, out_default="next to the first log, run_X.png")

    def body() -> int:
        args = parser.parse_args(argv)
        runs = [runlogs.load(path) for path in args.logs]
        out = args.out or default_out(args.logs)
        runlogs.save_figure(plot_runs(runs, args.smooth), out)
        print(f"wrote {out}")
        return 0

    return errors.run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
