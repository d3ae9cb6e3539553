"""plots/: the three scripts run as users run them, on a real train.py log, partial logs and bad input."""

import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest
from matplotlib.figure import Figure
from test_train import ok, run_train, tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = os.path.join(ROOT, "plots")
sys.path.insert(0, PLOTS)  # the scripts import their sibling runlogs.py as a top-level module

import analyze_run  # noqa: E402
import compare_runs  # noqa: E402
import plot_single_run  # noqa: E402
import runlogs  # noqa: E402

SCRIPTS = ["plot_single_run.py", "compare_runs.py", "analyze_run.py"]


def run_script(script: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """python plots/SCRIPT ARGS, from cwd (the repo root, or plots/ as the training guide's command does)."""
    path = os.path.relpath(os.path.join(PLOTS, script), cwd)
    return subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def assert_png(path: str) -> None:
    """A real PNG of a sensible size: signature, IHDR width and height, some bytes."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    assert 800 <= width <= 2000 and 600 <= height <= 2000, (width, height)
    assert os.path.getsize(path) > 20_000


@pytest.fixture(scope="module")
def train_log(char_dataset: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A genuine run log: 12 iterations of a tiny LLaMA-3 on CPU, evaluations and per-module grad norms."""
    out = tmp_path_factory.mktemp("plots_run")
    ok(
        run_train(
            tiny_args(char_dataset, out, "--max_iters=12", "--eval_interval=4", "--gradient_log_interval=4")
        )
    )
    (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.startswith("run_") and f.endswith(".json")]
    return path


def variant(train_log: str, tmp_path: pathlib.Path, name: str) -> str:
    """The real log edited into what a run in progress, or another device, would write."""
    log = read(train_log)
    if name == "one record":  # the first (untimed) step logged, no evaluation yet
        log["training_iterations"] = log["training_iterations"][:1]
        log["evaluations"], log["gradient_norms"], log["events"] = [], [], []
    elif name == "no records":  # the header written at start-up, nothing else
        log["training_iterations"], log["evaluations"], log["gradient_norms"], log["events"] = [], [], [], []
    elif name == "eval_only":  # train.py --eval_only: one evaluation without tokens_seen
        log["training_iterations"], log["gradient_norms"] = [], []
        log["evaluations"] = [{k: v for k, v in log["evaluations"][0].items() if k != "tokens_seen"}]
    elif name == "gpu fields":  # MFU and memory present, as on a known GPU (values invented)
        log["environment"] |= {
            "device": "cuda:0",
            "gpu_name": "NVIDIA H100 80GB HBM3",
            "peak_flops": 989.4e12,
        }
        for i, r in enumerate(log["training_iterations"]):
            if r["dt_ms"] is not None:
                r |= {"mfu": 0.3 + 0.01 * i, "memory_allocated_gb": 10.0 + i, "memory_peak_gb": 20.0 + i}
    path = tmp_path / f"run_{name.replace(' ', '_')}.json"
    path.write_text(json.dumps(log))
    return str(path)


# -----------------------------------------------------------------------------
# Figures


def test_plot_single_run_from_repo_root(train_log: str) -> None:
    p = ok(run_script("plot_single_run.py", train_log))
    png = os.path.splitext(train_log)[0] + ".png"  # default: next to the log
    assert p.stdout.strip() == f"wrote {png}" and p.stderr == ""
    assert_png(png)


def test_plot_single_run_from_plots_dir(train_log: str, tmp_path: pathlib.Path) -> None:
    # the training guide's command: cd plots && python plot_single_run.py ../saves/run_*.json; relative paths are the CWD's
    log, out = os.path.relpath(train_log, PLOTS), os.path.relpath(tmp_path / "fig" / "run.png", PLOTS)
    p = ok(run_script("plot_single_run.py", log, "--out", out, cwd=PLOTS))
    assert p.stdout.strip() == f"wrote {out}"
    assert_png(str(tmp_path / "fig" / "run.png"))


def test_compare_runs(train_log: str, tmp_path: pathlib.Path) -> None:
    other = variant(train_log, tmp_path, "gpu fields")
    out = str(tmp_path / "cmp.png")
    p = ok(run_script("compare_runs.py", train_log, other, "--labels", "cpu,gpu", "--out", out))
    assert p.stdout.strip() == f"wrote {out}"
    assert_png(out)
    p = ok(run_script("compare_runs.py", train_log, other))  # default: next to the first log
    assert_png(os.path.join(os.path.dirname(train_log), "compare_runs.png"))


def test_compare_runs_against_wall_time(train_log: str, tmp_path: pathlib.Path) -> None:
    """--time: each record's elapsed_s (train.py stamps it as the record is logged) on the second loss panel's x
    axis. The stamps follow the run's order (an evaluation at iteration k between the steps k-1 and k) and
    cover the timed steps between them (dt_ms excludes evaluations, elapsed_s does not)."""
    run = runlogs.load(train_log)
    steps = {r["iter"]: r for r in run["training_iterations"]}
    assert all(r["elapsed_s"] > 0 for r in steps.values())
    for it, r in steps.items():
        if it - 1 in steps and it - 2 in steps and r["dt_ms"] is not None:  # a window of one step, after the first
            assert r["elapsed_s"] - steps[it - 1]["elapsed_s"] >= r["dt_ms"] / 1000 - 0.005, it
    for e in run["evaluations"]:
        before, after = steps.get(e["iter"] - 1), steps.get(e["iter"])
        assert (before is None or before["elapsed_s"] <= e["elapsed_s"]) and (
            after is None or e["elapsed_s"] <= after["elapsed_s"]), e["iter"]

    fig = compare_runs.plot_comparison([run], ["run"], time=True)
    ax = next(a for a in fig.axes if a.get_title() == "Loss against wall time")
    (val,) = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert list(val.get_xdata()) == [e["elapsed_s"] for e in run["evaluations"]]
    assert list(val.get_ydata()) == [e["val_loss"] for e in run["evaluations"]]
    old = runlogs.load(train_log)  # a log written before elapsed_s existed: the panel says so
    for r in old["training_iterations"] + old["evaluations"]:
        del r["elapsed_s"]
    notes = panel_notes(compare_runs.plot_comparison([old], ["old"], time=True))
    assert compare_runs.TIME_MISSING in notes["Loss against wall time"]

    out = str(tmp_path / "time.png")
    p = ok(run_script("compare_runs.py", train_log, variant(train_log, tmp_path, "gpu fields"), "--time", "--out", out))
    assert p.stdout.strip() == f"wrote {out}"
    assert_png(out)


@pytest.mark.parametrize("name", ["one record", "no records", "eval_only", "gpu fields"])
def test_partial_and_other_logs(name: str, train_log: str, tmp_path: pathlib.Path) -> None:
    log = variant(train_log, tmp_path, name)
    ok(run_script("plot_single_run.py", log, train_log, "--out", str(tmp_path / "overlay.png")))
    assert_png(str(tmp_path / "overlay.png"))
    ok(run_script("plot_single_run.py", log))
    assert_png(os.path.splitext(log)[0] + ".png")
    ok(run_script("compare_runs.py", log, "--out", str(tmp_path / "cmp.png")))
    assert_png(str(tmp_path / "cmp.png"))
    p = ok(run_script("analyze_run.py", log, "--tokens", "1e9"))
    if name in ("one record", "no records", "eval_only"):
        assert "speed: n/a" in p.stdout and "n/a (no timed record" in p.stdout


def panel_notes(fig: Figure) -> dict[str, str]:
    """Each visible panel's title and the text drawn on it (the 'no data' notes)."""
    return {ax.get_title(): " ".join(t.get_text() for t in ax.texts) for ax in fig.axes if ax.get_visible()}


def test_missing_fields_are_noted_not_dropped(train_log: str, tmp_path: pathlib.Path) -> None:
    cpu = runlogs.load(train_log)
    fig = plot_single_run.plot_runs([cpu])
    notes = panel_notes(fig)
    memory = next(ax for ax in fig.axes if ax.get_title() == plot_single_run.MEMORY_TITLE)
    (host,) = memory.get_lines()  # no GPU lines on CPU: only the host's peak RSS
    assert host.get_label() == "host memory (peak RSS)"
    assert list(host.get_ydata()) == [r["memory_host_peak_gb"] for r in cpu["training_iterations"]]
    assert all(y > 0 for y in host.get_ydata())
    for r in cpu["training_iterations"]:
        assert r["memory_allocated_gb"] is None and r["memory_peak_gb"] is None
    old = runlogs.load(train_log)  # a log written before memory_host_peak_gb existed
    for r in old["training_iterations"]:
        del r["memory_host_peak_gb"]
    assert "no data" in panel_notes(plot_single_run.plot_runs([old]))[plot_single_run.MEMORY_TITLE]
    assert "no data" in notes["Model FLOPs utilisation"] and "CPU" in notes["Model FLOPs utilisation"]
    assert notes[plot_single_run.MEMORY_TITLE] == ""  # the host's peak RSS is drawn on CPU
    assert notes["Loss"] == "" and notes["Throughput"] == ""
    assert any(t.startswith("Gradient norm by module") for t in notes)  # gradient_log_interval=4
    gpu = runlogs.load(variant(train_log, tmp_path, "gpu fields"))
    notes = panel_notes(plot_single_run.plot_runs([gpu]))
    assert notes["Model FLOPs utilisation"] == "" and notes[plot_single_run.MEMORY_TITLE] == ""
    one = runlogs.load(variant(train_log, tmp_path, "one record"))
    assert "no timed step" in panel_notes(plot_single_run.plot_runs([one]))["Throughput"]


def test_scripts_import_neither_torch_nor_train() -> None:
    code = (
        "import sys; sys.path.insert(0, 'plots'); import plot_single_run, compare_runs, analyze_run; "
        "print(sorted(m for m in ('torch', 'train', 'model', 'runlog') if m in sys.modules))"
    )
    p = ok(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60))
    assert p.stdout.strip() == "[]"


# -----------------------------------------------------------------------------
# analyze_run.py against figures computed here from the log


def number(text: str) -> float:
    return float(text.replace(",", ""))


def row(stdout: str, name: str) -> list[float]:
    """The numbers (mean, min, max) of one speed row."""
    (line,) = [line for line in stdout.splitlines() if line.startswith(name)]
    return [number(v) for v in re.findall(r"[\d,]+\.?\d*", line[20:])]


@pytest.mark.parametrize("skip", [None, 4])
def test_analyze_run_figures(skip: int | None, train_log: str) -> None:
    log = read(train_log)
    records = log["training_iterations"]
    if skip is None:  # the documented rule: min(10% of records, records of the first 50 iterations)
        skip = min(len(records) // 10, len([r for r in records if r["iter"] < records[0]["iter"] + 50]))
        args = []
    else:
        args = ["--skip", str(skip)]
    assert len(records) == 12 and skip in (1, 4)
    kept = [r for r in records[skip:] if r["dt_ms"] is not None]
    dt = [r["dt_ms"] for r in kept]
    tps = [r["tokens_per_sec"] for r in kept]
    p = ok(run_script("analyze_run.py", train_log, "--tokens", "1e9", *args))
    out = p.stdout
    assert f"speed over {len(kept)} timed records, iters {kept[0]['iter']} to 11 " in out
    assert f"skipped the first {skip} of 12 records" in out
    assert row(out, "time per iteration") == pytest.approx([sum(dt) / len(dt), min(dt), max(dt)], abs=6e-4)
    assert row(out, "tokens/s") == pytest.approx([sum(tps) / len(tps), min(tps), max(tps)], abs=0.6)
    assert "MFU                 n/a (MFU not computed on CPU" in out
    assert "memory peak         n/a (memory is only measured on CUDA; this run used cpu)" in out
    assert (
        f"latest              iter 11 of 12, {records[-1]['tokens_seen']:,} tokens seen, "
        f"loss {records[-1]['loss']:.4f}" in out
    )
    best = min(log["evaluations"], key=lambda e: e["val_loss"])
    assert f"best val loss       {best['val_loss']:.4f} at iter {best['iter']} " in out
    # extrapolation: 1e9 tokens at 4 x 1 x 32 = 128 tokens per iteration and the mean time per iteration
    assert "tokens/iteration    128 (config: 4 batch x 1 accumulation x 32 block)" in out
    iters = math.ceil(1e9 / 128)
    m = re.search(r"to 1e\+09 tokens\s+([\d,]+) iterations x ([\d,.]+) ms = ([\d,.]+) hours", out)
    assert m and number(m[1]) == iters == 7_812_500
    assert number(m[2]) == pytest.approx(sum(dt) / len(dt), abs=6e-4)
    assert number(m[3]) == pytest.approx(iters * (sum(dt) / len(dt)) / 1000 / 3600, abs=6e-3)


def test_analyze_run_gpu_fields(train_log: str, tmp_path: pathlib.Path) -> None:
    path = variant(train_log, tmp_path, "gpu fields")
    log = read(path)
    kept = [r for r in log["training_iterations"][1:] if r["dt_ms"] is not None]
    mfu = [100 * r["mfu"] for r in kept]
    peak = [r["memory_peak_gb"] for r in kept]
    out = ok(run_script("analyze_run.py", path)).stdout
    assert row(out, "MFU") == pytest.approx([sum(mfu) / len(mfu), min(mfu), max(mfu)], abs=6e-3)
    assert row(out, "memory peak") == pytest.approx([sum(peak) / len(peak), min(peak), max(peak)], abs=6e-4)
    assert "tokens/iteration" not in out  # no --tokens, no extrapolation


def resumed_run(train_log: str, folder: pathlib.Path) -> list[str]:
    """The real log as the two logs of a resumed run, in one folder: the first killed after iter 8, the
    second resumed from a checkpoint at iter 6, so iters 6-8 are in both (the second's with other times)."""
    log = read(train_log)
    first, second = json.loads(json.dumps(log)), json.loads(json.dumps(log))
    for key in ("training_iterations", "evaluations", "gradient_norms"):
        first[key] = [r for r in log[key] if r["iter"] <= 8]
        second[key] = [r for r in log[key] if r["iter"] >= 6]
    first["started_at"], second["started_at"] = "2026-01-01T00:00:00", "2026-01-01T01:00:00"
    second["config"]["train"]["init_from"] = "resume"
    for r in second["training_iterations"]:
        if r["iter"] == 6:  # a new process: its first step is untimed
            r["dt_ms"] = r["tokens_per_sec"] = None
        elif r["iter"] <= 8:
            r["dt_ms"] = 1000.0 + r["iter"]
    folder.mkdir()
    paths = [str(folder / "run_20260101_000000.json"), str(folder / "run_20260101_010000.json")]
    for path, part in zip(paths, (first, second)):
        pathlib.Path(path).write_text(json.dumps(part))
    return paths


def test_analyze_run_merges_the_logs_of_a_resumed_run(train_log: str, tmp_path: pathlib.Path) -> None:
    first, second = resumed_run(train_log, tmp_path / "resumed")
    out = ok(run_script("analyze_run.py", first, second, "--tokens", "1e9")).stdout
    assert ok(run_script("analyze_run.py", second, first, "--tokens", "1e9")).stdout == out  # start order
    assert out.count("\nrun ") + out.startswith("run ") == 1  # one report: two parts of one run
    assert out.startswith(f"run                 {second} ")
    assert ("note                2 logs of one resumed run, merged by iteration (a later log's records replace "
            "an earlier one's where both cover an iteration): run_20260101_000000.json (iters 0-5), "
            "run_20260101_010000.json (iters 6-11)") in out
    log = read(train_log)
    records = log["training_iterations"]
    assert f"latest              iter 11 of 12, {records[-1]['tokens_seen']:,} tokens seen" in out
    # the warm-up rule per part (0 records each for 6-record parts); untimed: iter 0, and iter 6 of the second
    merged = read(first)["training_iterations"][:6] + read(second)["training_iterations"]
    kept = [r for r in merged if r["dt_ms"] is not None]
    dt = [r["dt_ms"] for r in kept]
    assert [r["iter"] for r in kept] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11] and 1007.0 in dt
    assert "speed over 10 timed records, iters 1 to 11 (skipped the first 0 + 0 of 12 records as warm-up, " \
           "counted from the start of each log, 2 untimed)" in out
    assert row(out, "time per iteration") == pytest.approx([sum(dt) / len(dt), min(dt), max(dt)], abs=6e-4)
    best = min(log["evaluations"], key=lambda e: e["val_loss"])
    assert f"best val loss       {best['val_loss']:.4f} at iter {best['iter']} " in out
    assert f"evaluations: {len(log['evaluations'])})" in out  # iter 8 from the later log only


def test_analyze_run_gives_one_report_per_run(train_log: str, tmp_path: pathlib.Path) -> None:
    other = variant(train_log, tmp_path, "gpu fields")  # another folder: another run
    first, _ = resumed_run(train_log, tmp_path / "resumed")
    again = tmp_path / "resumed" / "run_20260102_000000.json"  # a new run from scratch into the same folder
    again.write_text(json.dumps(read(train_log) | {"started_at": "2026-01-02T00:00:00"}))
    out = ok(run_script("analyze_run.py", train_log, other, first, str(again))).stdout
    reports = out.split("\n\n" + "run ")
    heads = [line for line in out.splitlines() if line.startswith("run ")]
    assert len(reports) == 4 and len(heads) == 4, out
    assert [h.split()[1] for h in heads] == [train_log, other, first, str(again)]
    assert "logs of one resumed run" not in out  # none of these continues another


def test_extrapolation_arithmetic() -> None:
    assert analyze_run.extrapolate(1000, 100, 3600.0) == (10, 0.01)  # 10 steps of 3.6 s
    assert analyze_run.extrapolate(1001, 100, 1000.0)[0] == 11  # a started step is a whole step
    # the training guide's question: 85e9 tokens at the quickstart's 768 tokens per iteration
    iters, hours = analyze_run.extrapolate(85e9, 768, 41.787)
    assert iters == 110_677_084 and hours == pytest.approx(110_677_084 * 41.787 / 3.6e6)


def test_tokens_per_iteration_without_config(train_log: str, tmp_path: pathlib.Path) -> None:
    log = read(train_log)
    log["config"] = {}
    path = tmp_path / "no_config.json"
    path.write_text(json.dumps(log))
    out = ok(run_script("analyze_run.py", str(path), "--tokens", "1e6")).stdout
    assert "tokens/iteration    128 (tokens_seen over the logged iterations)" in out


def iters_records(first: int, n: int, step: int) -> list[dict]:
    return [{"iter": first + i * step} for i in range(n)]


def test_warmup_rule() -> None:
    assert analyze_run.warmup_skip([]) == 0
    assert analyze_run.warmup_skip(iters_records(0, 201, 10)) == 5  # quickstart: 50 iterations < 10% (20)
    assert analyze_run.warmup_skip(iters_records(0, 12, 1)) == 1  # 10% of 12 records < 50 iterations
    assert analyze_run.warmup_skip(iters_records(0, 1000, 1)) == 50
    assert analyze_run.warmup_skip(iters_records(5000, 1000, 1)) == 50  # a resumed run warms up again


def test_ema() -> None:
    assert runlogs.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    assert runlogs.ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 5.0 / 0.75])
    assert runlogs.ema([1.0, 5.0, 3.0], 0.0) == [1.0, 5.0, 3.0]
    assert runlogs.ema([]) == []


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback, nonzero exit


def bad_inputs(tmp_path: pathlib.Path) -> dict[str, tuple[list[str], str]]:
    """Files that are not run logs, for every script: args and the expected message."""
    (tmp_path / "notes.txt").write_text("loss went down\n")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "other.json").write_text('{"training_iterations": [{"loss": 1.0}]}')
    return {
        "missing file": ([str(tmp_path / "nope.json")], "no such file"),
        "directory": ([str(tmp_path)], "is a directory"),
        "not JSON": ([str(tmp_path / "notes.txt")], "is not JSON"),
        "JSON, not a run log": ([str(tmp_path / "list.json")], "is not a run log"),
        "records without iter": ([str(tmp_path / "other.json")], "is not a run log"),
        "no argument": ([], "the following arguments are required"),
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_clean_line(script: str, train_log: str, tmp_path: pathlib.Path) -> None:
    cases = bad_inputs(tmp_path)
    if script != "analyze_run.py":  # the same runlogs.load; a subset keeps the matplotlib start-ups few
        cases = {k: cases[k] for k in ("missing file", "not JSON", "JSON, not a run log")}
    if script == "analyze_run.py":
        cases |= {
            "bad --tokens": ([train_log, "--tokens", "lots"], "'lots' is not a number"),
            "negative --tokens": ([train_log, "--tokens=-5"], "must be a positive number of tokens"),
        }
    else:
        cases |= {
            "bad --out": ([train_log, "--out", str(tmp_path / "fig.txt")], "has no image extension"),
            "bad --smooth": ([train_log, "--smooth", "1.5"], "must be in [0, 1)"),
        }
    if script == "compare_runs.py":
        cases["labels"] = ([train_log, train_log, "--labels", "a"], "--labels has 1 names for 2 logs")
    for case, (args, message) in cases.items():
        p = run_script(script, *args)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode != 0 and "Traceback" not in p.stderr, (case, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, p.stderr)
