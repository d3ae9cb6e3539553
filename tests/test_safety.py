"""Never lose a user's work: a finished run is not overwritten, one run per out_dir, a full disk is one line,
signals stop a run within seconds in every phase, and workers whose launcher died stop."""

import glob
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import read_until
from test_train import ROOT, _assert_clean_error, ok, read_log, run_train, tiny_args

import checkpoint


def _digest(folder) -> dict[str, str]:
    """sha256 of every file under folder, by relative path."""
    out = {}
    for path in sorted(glob.glob(os.path.join(str(folder), "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(char_dataset, tmp_path_factory):
    """A finished 4-step run (its ckpt/ at iter 4) to copy into each test's own out_dir."""
    out = tmp_path_factory.mktemp("trained") / "run"
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=4", "--eval_interval=4")))
    return out


def _copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


# -----------------------------------------------------------------------------
# A new run never replaces a trained model by accident


def test_a_new_run_refuses_an_out_dir_that_holds_a_checkpoint(trained, char_dataset, tmp_path):
    out = _copy(trained, tmp_path)
    before = _digest(out / "ckpt")
    p = run_train(tiny_args(char_dataset, out, "--max_iters=1"), timeout=120)
    _assert_clean_error(p, "holds a trained model")
    assert "--init_from=resume" in p.stderr and "--overwrite_out_dir=True" in p.stderr
    assert _digest(out / "ckpt") == before  # the trained model is untouched
    # a Hugging Face start is refused the same way; eval_only and a resume are fine
    ok(run_train(tiny_args(char_dataset, out, "--init_from=resume", "--eval_only=True")))
    assert _digest(out / "ckpt") == before
    # on purpose, but with a mistake in the new run's flags: it fails its checks and the old model stays
    p = run_train(tiny_args(char_dataset, out, "--max_iters=1", "--overwrite_out_dir=True", "--block_size=1000000"))
    _assert_clean_error(p, "block_size=1000000")
    assert _digest(out / "ckpt") == before
    # on purpose: the old checkpoint is deleted once the new run starts, and the new run's replaces it
    p = ok(run_train(tiny_args(char_dataset, out, "--max_iters=1", "--eval_interval=1", "--overwrite_out_dir=True")))
    assert "overwrite_out_dir: deleted the previous checkpoint" in p.stdout
    assert checkpoint.read_state(str(out / "ckpt"))["iter_num"] == 1


def test_booleans_take_only_true_or_false(char_dataset, tmp_path):
    for value in ("yes", "1", "on"):
        p = run_train(tiny_args(char_dataset, tmp_path / "o", f"--compile={value}"), timeout=60)
        _assert_clean_error(p, f"compile='{value}' is not a boolean; use True or False")


# -----------------------------------------------------------------------------
# One run per out_dir


def test_a_second_run_into_a_locked_out_dir_fails_at_once_naming_the_holder(trained, char_dataset, tmp_path):
    out = _copy(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import checkpoint; "
                               f"f = checkpoint.lock({str(out)!r}); print('locked', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        p = run_train(tiny_args(char_dataset, out, "--init_from=resume", "--max_iters=6"), timeout=120)
        _assert_clean_error(p, f"another run (pid {holder.pid}) is writing to --out_dir={out}")
        assert time.monotonic() - t0 < 60 and not os.path.exists(out / "ckpt.tmp")
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait(timeout=60)
    ok(run_train(tiny_args(char_dataset, out, "--init_from=resume", "--max_iters=5", "--eval_interval=5")))


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True) if "train.py" in " ".join(c.cmdline())]


@pytest.mark.slow
def test_workers_stop_when_their_launcher_is_killed(char_dataset, tmp_path):
    """torchrun's workers run in sessions of their own: after kill -9 of torchrun alone they stop within 10 s."""
    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *tiny_args(char_dataset, tmp_path / "o", "--max_iters=100000", "--eval_interval=100000",
                      "--gradient_accumulation_steps=2")]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = read_until(launcher, "iter 3:")  # both workers are training
        workers = _children(launcher.pid)
        assert len(workers) == 2, "".join(seen)[-2000:]
        launcher.kill()
        launcher.wait(timeout=60)
        t0 = time.monotonic()
        while any(psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE for w in workers):
            assert time.monotonic() - t0 < 10, "the workers are still training 10 s after their launcher died"
            time.sleep(0.2)
    finally:  # whatever failed: kill every process of this run (its out_dir is in each command line)
        launcher.kill()
        launcher.wait(timeout=60)
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
    assert not os.path.exists(tmp_path / "o" / "ckpt.tmp") or not os.path.exists(tmp_path / "o" / "ckpt")


# -----------------------------------------------------------------------------
# A full disk: one line, the previous checkpoint intact, no temp folder left


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_that_fails_inside_a_save_is_one_line_and_keeps_the_last_checkpoint(trained, char_dataset, tmp_path):
    """A file-size limit makes torch.save's writes fail mid-file, as a full disk does (torch reports it as a
    RuntimeError from its zip writer): one error line, the last checkpoint intact, its temp folder gone."""
    out = _copy(trained, tmp_path)
    before = _digest(out / "ckpt")
    args = tiny_args(char_dataset, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2")
    p = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(2**20))  # the run log fits; model.pt (6 MB) does not
    _assert_clean_error(p, "cannot write checkpoint ckpt in")
    assert f"the previous checkpoint {out}/ckpt is intact" in p.stderr and "temp folder is removed" in p.stderr
    assert _digest(out / "ckpt") == before and not os.path.exists(out / "ckpt.tmp")


def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="mounting a small tmpfs needs root; the file-size-limit test covers the same save path")
def test_a_full_disk_is_one_line_naming_the_space_needed(trained, char_dataset, tmp_path):
    """A real full disk: the checkpoint checks the free space before writing. A tmpfs holds the trained run and
    less than one more checkpoint."""
    disk = tmp_path / "disk"
    size = sum(os.path.getsize(f) for f in glob.glob(str(trained / "ckpt" / "*"))) + 3 * 2**20
    if not _mount_tmpfs(disk, str(size)):
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        out = disk / "run"
        shutil.copytree(trained, out)
        before = _digest(out / "ckpt")
        p = run_train(tiny_args(char_dataset, out, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
        _assert_clean_error(p, "not enough space for checkpoint ckpt in")
        assert "MiB are free" in p.stderr and f"the previous checkpoint {out}/ckpt is intact" in p.stderr
        assert _digest(out / "ckpt") == before and not os.path.exists(out / "ckpt.tmp")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=60)


# -----------------------------------------------------------------------------
# Signals: within seconds in every phase


def _signal_when(args: list[str], ready: str, env: dict | None = None) -> tuple[subprocess.Popen, float, str]:
    """Start train.py, send SIGTERM as soon as a stdout line starts with `ready` (the line that opens the phase
    under test); (process, seconds from the signal to the exit, all output). The process is killed whatever
    failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        seen = read_until(p, ready)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    return p, time.monotonic() - t0, "".join(seen) + rest


@pytest.mark.slow
def test_sigterm_while_compiling_exits_within_seconds(char_dataset, tmp_path):
    """Before the first step there is nothing new to save: the run exits at once, not after the compile. The
    signal follows the iter-0 evaluation's line, after which the first step compiles (~30 s on 2 cores without
    a compile cache); an exit that waited for the compile would take that long."""
    args = tiny_args(char_dataset, tmp_path / "o", "--max_iters=5", "--eval_iters=1").copy()
    args[args.index("--compile=False")] = "--compile=True"
    p, seconds, out = _signal_when(args, "eval iter 0:", env={"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    assert p.returncode == 130 and seconds < 5, (seconds, out[-2000:])
    assert "stopped before the first step; nothing new to save" in out and "Traceback" not in out
    assert not os.path.exists(tmp_path / "o" / "ckpt")


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_stops_between_batches_and_saves(tmp_path):
    """The signal follows iter 4's line, after which the run evaluates iter 5 (100 batches a split). The
    evaluation stops between batches: no evaluation of iter 5 is logged (one that ran to its end would be),
    whatever the machine's speed, and the checkpoint holds the 5 steps taken."""
    from conftest import write_char_dataset

    out = tmp_path / "o"
    data = write_char_dataset(tmp_path / "chars", n_chars=200_000)  # a val split of 625 windows
    args = tiny_args(data, out, "--max_iters=10", "--eval_interval=5", "--eval_iters=100")
    p, seconds, text = _signal_when(args, "iter 4:")
    assert p.returncode == 130, (seconds, text[-2000:])
    assert "interrupted at iter 5" in text and "Traceback" not in text
    assert checkpoint.read_state(str(out / "ckpt"))["iter_num"] == 5
    log = read_log(out)
    assert [r["iter"] for r in log["training_iterations"]][-1] == 4  # no step after the signal
    assert [r["iter"] for r in log["evaluations"]] == [0]  # iter 5's evaluation was cut short


@pytest.mark.slow
def test_sigterm_to_both_ranks_during_an_evaluation_stops_them_together_and_saves(tmp_path):
    """Under torchrun (2 gloo ranks), SIGTERM to both workers (as a scheduler sends it) once iter 4 is logged:
    the ranks agree between evaluation batches, cut iter 5's evaluation short (no record of it), save the 5
    steps and exit 130. A rank that stopped alone would leave the other in a collective until the timeout."""
    import psutil
    from conftest import write_char_dataset

    out = tmp_path / "o"
    data = write_char_dataset(tmp_path / "chars", n_chars=200_000)  # 625 val windows: 60 batches of 4 x 2 ranks
    args = tiny_args(data, out, "--max_iters=10", "--eval_interval=5", "--eval_iters=60",
                     "--gradient_accumulation_steps=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        seen = read_until(p, "iter 4:")
        workers = _children(p.pid)
        assert len(workers) == 2, "".join(seen)[-2000:]
        for w in workers:
            os.kill(w, signal.SIGTERM)
        rest, _ = p.communicate(timeout=120)
    finally:  # whatever failed: kill every process of this run (its out_dir is in each command line)
        p.kill()
        p.wait(timeout=60)
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()
    text = "".join(seen) + rest
    ours = text.split("failed (exitcode")[0]  # torchrun then reports the worker's status 130 with its own traceback
    assert "interrupted at iter 5" in ours and "Traceback" not in ours and "exitcode: 130" in text, text[-3000:]
    assert checkpoint.read_state(str(out / "ckpt"))["iter_num"] == 5
    log = read_log(out)
    assert [r["iter"] for r in log["training_iterations"]][-1] == 4
    assert [r["iter"] for r in log["evaluations"]] == [0]  # iter 5's evaluation was cut short on both ranks


# -----------------------------------------------------------------------------
# What a newcomer hit


def test_sample_rejects_an_unknown_dtype_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path}", "--dtype=float8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    _assert_clean_error(p, "dtype='float8' is not one of auto, bfloat16, float16, float32")


def test_a_large_vocabulary_preset_refuses_a_character_dataset(char_dataset, tmp_path):
    p = run_train(["config/full_llama3_1.5b_optimal.py", f"--dataset={char_dataset}", f"--out_dir={tmp_path}",
                   "--device=cpu", "--compile=False", "--max_iters=1"], timeout=120)
    _assert_clean_error(p, "output rows would never see a token")
    assert "--vocab_size=" in p.stderr and not os.path.exists(tmp_path / "ckpt")


def test_a_dataset_folder_without_meta_names_a_real_prepare_command(tmp_path):
    import token_loader

    (tmp_path / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(token_loader.DataError) as e:
        token_loader.read_meta(str(tmp_path / "elsewhere"))
    message = str(e.value)
    assert "<name>" not in message and "data/DATASET/prepare.py --input=YOUR_TEXT" in message
    assert "shakespeare_char" in message and "slimpajama_6b_llama3" in message


def test_a_cpu_run_says_plainly_that_it_has_no_mfu(trained, char_dataset, tmp_path):
    out = _copy(trained, tmp_path)
    p = ok(run_train(tiny_args(char_dataset, out, "--init_from=resume", "--eval_only=True")))
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("tokens per step"))
    assert line.endswith("; MFU not computed on CPU: there is no reliable peak FLOP/s") and "MFU: MFU" not in line


def test_the_memory_panel_starts_at_zero(trained):
    sys.path.insert(0, os.path.join(ROOT, "plots"))
    import plot_single_run
    import runlogs

    (log,) = glob.glob(str(trained / "run_*.json"))
    fig = plot_single_run.plot_runs([runlogs.load(log)])
    memory = next(ax for ax in fig.axes if ax.get_title() == plot_single_run.MEMORY_TITLE)
    labels = {t.get_text() for t in memory.get_legend().get_texts()}
    assert memory.get_ylim()[0] == 0 and labels == {"host memory (peak RSS)"}  # a CPU run: no GPU series


def test_dry_run_gives_the_run_s_tokens_and_how_to_plan_several_gpus():
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    p = ok(subprocess.run([sys.executable, "train.py", "config/full_llama3_1.5b_optimal.py", "--dry_run=True"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120))
    # 393,216 tokens per step x 50,000 steps (the preset's max_iters)
    import json

    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["total_tokens"] == summary["tokens_per_step"] * 50_000 == 19_660_800_000
    assert "whole run: 50,000 steps x 393,216 = 19,660,800,000 tokens (19.66B)" in p.stdout
    assert "prefix WORLD_SIZE=N" in p.stdout
    p8 = ok(subprocess.run([sys.executable, "train.py", "config/full_llama3_1.5b_optimal.py", "--dry_run=True",
                            "--use_zero1=True"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "WORLD_SIZE": "8"}, timeout=120))
    assert json.loads(p8.stdout.strip().splitlines()[-1])["world_size"] == 8 and "prefix WORLD_SIZE" not in p8.stdout


def test_a_char_dry_run_counts_the_dataset_s_vocabulary(char_dataset):
    """The quickstart's shape on a prepared character dataset: the vocabulary training would use (the
    dataset's, padded to 64), not ModelConfig's GPT-2 default."""
    import json

    p = ok(subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", f"--dataset={char_dataset}",
                           "--dry_run=True"], cwd=ROOT, capture_output=True, text=True, timeout=120))
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    with open(os.path.join(char_dataset, "meta.json")) as f:
        vocab = -(-json.load(f)["vocab_size"] // 64) * 64
    n_embd, n_layer, block = 128, 4, 64
    per_layer = 12 * n_embd**2 + 13 * n_embd  # attention 4C^2 + 4C, MLP 8C^2 + 5C, two LayerNorms 4C
    assert summary["n_params"] == vocab * n_embd + block * n_embd + n_layer * per_layer + 2 * n_embd
