"""What a newcomer hits at start: sizes that cannot fit, unwritable folders, a crash's leftovers."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, _assert_clean_error, ok, read_log, run_train, tiny_args

import configurator
import errors
import hardware
import token_loader
from model import GPT, ModelConfig

# -----------------------------------------------------------------------------
# Settings that would hang without a start check: one error line before any work


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size=999999999"], "the global batch of 999,999,999 sequences"),
        (["--eval_iters=100000000"], "eval_iters=100000000 reads 400,000,000 sequences"),
        (["--block_size=1000000"], "block_size=1000000 needs windows of 1000001 tokens"),
    ],
)
def test_sizes_larger_than_the_split_fail_at_once(args, message, char_dataset, tmp_path):
    p = run_train(tiny_args(char_dataset, tmp_path / "o", "--max_iters=2", *args), timeout=60)
    _assert_clean_error(p, message)
    assert not os.path.exists(tmp_path / "o" / "ckpt") and not glob.glob(str(tmp_path / "o" / "run_*"))


def test_check_sizes_numbers():
    windows = {"train": 1000, "val": 100}
    token_loader.check_sizes(windows, 32, 10, 2, 5, 1, host_bytes=2**30)  # G = 100: exactly the val split
    with pytest.raises(token_loader.DataError, match="global batch of 1,010 sequences.*at most 100$"):
        token_loader.check_sizes(windows, 32, 101, 2, 5, 1, host_bytes=2**30)
    # the smallest split bounds eval_iters: 3 x 40 > 100 val windows, and 100 // 40 = 2 fit
    with pytest.raises(token_loader.DataError, match="val split has 100 windows.*at most 2$"):
        token_loader.check_sizes(windows, 32, 4, 10, 1, 3, host_bytes=2**30)
    # one batch on the host: 8 bytes x B x (3T + 1) = 8 x 4 x 97 = 3104 bytes
    token_loader.check_sizes(windows, 32, 4, 1, 1, 1, host_bytes=3104)
    with pytest.raises(token_loader.DataError, match="one batch of 4 x 32 tokens needs"):
        token_loader.check_sizes(windows, 32, 4, 1, 1, 1, host_bytes=3103)
    assert token_loader.available_host_bytes() > 0


def test_eval_batches_are_lazy_and_unchanged(char_dataset):
    """The same windows in the same order as the materialised list they replace, one batch at a time."""
    shards = token_loader.Shards(char_dataset, "val", 32)
    data = token_loader.MicroBatches(shards, 4, 1, 1, 2, token_loader.EVAL_SEED)
    expected = [data[k] for k in range(5)]
    batches = token_loader.eval_batches(char_dataset, "val", 32, 4, 5, rank=1, world_size=2)
    for _ in range(2):  # every pass reads the same batches
        got = list(batches)
        assert len(got) == len(batches) == 5
        for (x, y), (ex, ey) in zip(got, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    huge = token_loader.eval_batches(char_dataset, "val", 32, 4, 10**9)  # nothing read up front
    assert len(huge) == 10**9 and torch.equal(huge[0][0], token_loader.eval_batches(char_dataset, "val", 32, 4, 1)[0][0])


# -----------------------------------------------------------------------------
# Memory before OOM, with a stubbed device size


def test_memory_fit_with_a_stubbed_device():
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=256))
    args = (256, "bfloat16", 1, False, False, True)

    def need(b: int) -> float:
        return hardware.estimate_memory(model, b, *args)["total_gb"] * 1024**3

    assert hardware.memory_fit(model, 64, *args, free_bytes=int(need(64)) + 1) is None
    free = int((need(20) + need(21)) / 2)  # between 20 and 21 sequences
    msg = hardware.memory_fit(model, 64, *args, free_bytes=free)
    assert f"estimated {need(64) / 1024**3:.2f} GiB" in msg and f"has {free / 1024**3:.2f} GiB free" in msg
    assert "the largest batch_size that fits is 20" in msg
    assert "not even batch_size 1 fits" in hardware.memory_fit(model, 64, *args, free_bytes=int(need(0)))


# -----------------------------------------------------------------------------
# An out_dir (or hf_dir) that cannot be written: one line, before any work

UNWRITABLE = {
    "not creatable": ("/proc/nope", "cannot be written"),
    "read-only folder": ("/proc", "cannot be written"),  # read-only even for root, unlike a chmod
    "a file": (None, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_unwritable_out_dir_in_process(case, tmp_path):
    path, message = UNWRITABLE[case]
    if path is None:
        path = str(tmp_path / "f")
        open(path, "w").close()
    with pytest.raises(errors.ConfigError, match=message):
        configurator.check_output_dir(path)


def test_unwritable_out_dir_is_one_line_for_every_script(char_dataset, trained_run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for path, message in (("/proc/nope", "--out_dir=/proc/nope cannot be written"),
                          (str(a_file), "is a file, not a folder")):
        _assert_clean_error(run_train(tiny_args(char_dataset, path, "--max_iters=2"), timeout=120), message)
        p = subprocess.run([sys.executable, "export_hf.py", f"--out_dir={trained_run}", f"--hf_dir={path}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        _assert_clean_error(p, message.replace("out_dir", "hf_dir"))
        p = subprocess.run([sys.executable, "data/shakespeare/prepare.py", "--input", str(a_file), "--out_dir", path],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        _assert_clean_error(p, message)
        # sample.py only reads out_dir: the error names the missing checkpoint
        p = subprocess.run([sys.executable, "sample.py", f"--out_dir={path}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        _assert_clean_error(p, f"no checkpoint in {path}")


@pytest.fixture(scope="module")
def trained_run(char_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=2", "--eval_interval=2")))
    return str(out)


# -----------------------------------------------------------------------------
# A crash's temp files: cleaned at the next start, never plotted


@pytest.mark.slow
def test_kill_9_leftovers_are_cleaned_and_never_plotted(char_dataset, tmp_path):
    out = tmp_path / "run"
    common = ["--eval_interval=2", "--max_iters=4"]
    p = run_train(tiny_args(char_dataset, out, *common), env={"NANOLLM_CRASH_AT": "after_model:1:kill"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert os.path.isdir(out / "ckpt.tmp")  # killed inside the first save
    p = run_train(tiny_args(char_dataset, out, *common), env={"NANOLLM_CRASH_AT": "before_file_replace:3:kill"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert not os.path.exists(out / "ckpt.tmp")  # removed at this start
    assert len(glob.glob(str(out / "run_*.json.tmp"))) == 1  # killed inside a run-log rewrite
    logs = sorted(glob.glob(str(out / "run_*.json")))  # what a user (or plots/) globs: complete logs only
    assert len(logs) == 2 and not any(p.endswith(".tmp") for p in logs)
    png = str(tmp_path / "runs.png")
    ok(subprocess.run([sys.executable, "plots/plot_single_run.py", *logs, "--out", png], cwd=ROOT,
                      capture_output=True, text=True, timeout=600))
    ok(run_train(tiny_args(char_dataset, out, *common)))
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)
    assert read_log(out)["training_iterations"][-1]["iter"] == 3


def test_prepare_removes_its_own_leftover_temps(tmp_path):
    import dataprep
    from dataprep import Spec

    src = tmp_path / "d.txt"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"document number {i} " * 20)
    out = tmp_path / "o"
    spec = Spec(name="t", tokenizer="gpt2", val_fraction=0.5)
    dataprep.main(spec, ["--input", str(src), "--out_dir", str(out)])
    (out / "meta.json.tmp").write_text("{")  # what a kill inside atomic_write_json leaves
    (out / f"{dataprep.PROGRESS}.tmp").write_text("{")
    dataprep.main(spec, ["--input", str(src), "--out_dir", str(out)])  # "already prepared"
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
