"""DDP, ZeRO-1 and FSDP on CPU (torchrun, 2 gloo processes) against one process at the same global batch."""

import pytest
import torch
from test_train import _same_weights, _straight_and_resumed, losses, ok, read_log, run_train, tiny_args

pytestmark = pytest.mark.slow

MODES = {"ddp": [], "zero1": ["--use_zero1=True"], "fsdp": ["--use_fsdp=True"]}
# global batch: 2 sequences x 4 micro-steps (1 process) = 2 x 2 micro-steps x 2 processes
COMMON = ["--batch_size=2", "--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=3",
          "--lr_decay_iters=6"]


@pytest.fixture(scope="module")
def single_process(char_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    ok(run_train(tiny_args(char_dataset, out, *COMMON)))
    return read_log(out)


@pytest.mark.parametrize("mode", list(MODES))
def test_parallel_matches_single_process(mode, single_process, char_dataset, tmp_path):
    out = tmp_path / mode
    p = ok(run_train(tiny_args(char_dataset, out, *COMMON, *MODES[mode]), nproc=2))
    log = read_log(out)
    assert log["environment"]["world_size"] == 2
    assert "(2 per rank)" in p.stdout  # gradient accumulation 4 over 2 ranks
    ref, got = losses(single_process), losses(log)
    assert sorted(got) == list(range(6))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], abs=1e-5), (it, got[it], ref[it])
    for a, b in zip(single_process["evaluations"], log["evaluations"]):
        assert a["iter"] == b["iter"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    # the saved weights are the full, unsharded, prefix-free state dict either way
    mine = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod", "module")) for k in mine)


@pytest.mark.parametrize("mode", list(MODES))
def test_exact_resume_distributed(mode, char_dataset, tmp_path):
    straight, resumed, a, b = _straight_and_resumed(char_dataset, tmp_path, ["--batch_size=2",
                                                    "--gradient_accumulation_steps=2", *MODES[mode]], nproc=2)
    assert sorted(resumed) == list(range(8))
    assert resumed == straight
    assert _same_weights(a, b)


def test_zero1_resume_needs_same_world_size(char_dataset, tmp_path):
    out = tmp_path / "z"
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=2", "--eval_interval=2", "--use_zero1=True",
                           "--gradient_accumulation_steps=2"), nproc=2))
    p = run_train(tiny_args(char_dataset, out, "--max_iters=4", "--eval_interval=2", "--use_zero1=True",
                            "--gradient_accumulation_steps=2", "--init_from=resume"))
    assert p.returncode != 0 and "saved by 2 processes" in p.stderr


def test_accumulation_must_divide_world_size(char_dataset, tmp_path):
    p = run_train(tiny_args(char_dataset, tmp_path / "o", "--max_iters=2", "--gradient_accumulation_steps=3"),
                  nproc=2)
    assert p.returncode != 0 and "gradient_accumulation_steps=3 must be divisible" in p.stderr


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_parallel_matches_single_process(mode, single_process, char_dataset, tmp_path):
    """torch.compile(DDP(model)) with no_sync micro-steps, and FSDP2 over compiled blocks."""
    out = tmp_path / mode
    ok(run_train(tiny_args(char_dataset, out, *COMMON, *MODES[mode], "--compile=True"), nproc=2))
    ref, got = losses(single_process), losses(read_log(out))
    assert sorted(got) == sorted(ref)
    for it in ref:
        assert got[it] == pytest.approx(ref[it], abs=1e-4), (it, got[it], ref[it])


def test_ddp_kill_9_inside_a_save_resumes_to_the_same_weights(char_dataset, tmp_path):
    """Chaos under DDP: both workers die by SIGKILL inside the 2nd save (iter 4); the checkpoint of iter 2 is
    intact, and a resume ends with the weights of the run that was never killed, bit for bit."""
    import os

    import checkpoint

    common = ["--batch_size=2", "--gradient_accumulation_steps=2", "--max_iters=6", "--eval_interval=2",
              "--lr_decay_iters=6", "--dropout=0.1"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    ok(run_train(tiny_args(char_dataset, straight, *common), nproc=2))
    p = run_train(tiny_args(char_dataset, crashed, *common), nproc=2, env={"NANOLLM_CRASH_AT": "after_model:2:kill"})
    assert p.returncode != 0 and os.path.isdir(crashed / "ckpt.tmp")
    assert checkpoint.read_state(checkpoint.find(str(crashed)))["iter_num"] == 2
    ok(run_train(tiny_args(char_dataset, crashed, *common, "--init_from=resume"), nproc=2))
    assert _same_weights(str(straight), str(crashed))
    assert not os.path.exists(crashed / "ckpt.tmp") and not os.path.exists(crashed / "ckpt.old")


# The resume refusals TESTING.md promises, and the resumes across layouts that are allowed


def test_resume_with_another_parallelism_is_refused(char_dataset, tmp_path):
    out = tmp_path / "z"
    common = ["--eval_interval=2", "--gradient_accumulation_steps=2"]
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=2", "--use_zero1=True", *common), nproc=2))
    p = run_train(tiny_args(char_dataset, out, "--max_iters=4", "--use_fsdp=True", "--init_from=resume", *common),
                  nproc=2)
    assert p.returncode != 0 and "was saved with zero1 and this run uses fsdp" in p.stderr, p.stderr[-2000:]


def test_a_ddp_checkpoint_resumes_in_one_process(char_dataset, tmp_path):
    """DDP and one process keep the same optimizer file (the AdamW state is identical on every rank), and the
    loader's stream does not depend on the split of the global batch: 4 DDP steps + 4 in one process give the
    single process's 8-step loss curve."""
    common = ["--eval_interval=4", "--gradient_accumulation_steps=2", "--lr_decay_iters=8"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_train(tiny_args(char_dataset, straight, "--max_iters=8", *common)))
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=4", *common), nproc=2))
    first = losses(read_log(split))
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=8", "--init_from=resume", *common)))
    resumed = {**first, **losses(read_log(split))}
    ref = losses(read_log(straight))
    assert sorted(resumed) == list(range(8))
    for it in ref:
        assert resumed[it] == pytest.approx(ref[it], abs=1e-5), (it, resumed[it], ref[it])


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_fsdp_resumes_on_another_world_size(before, after, char_dataset, tmp_path):
    """FSDP's optimizer state is a DCP folder that reshards; 1 -> 2 processes also takes the branch where
    rank 1 has no saved RNG file (it starts fresh: dropout is off here, so the curve is unchanged)."""
    common = ["--eval_interval=4", "--gradient_accumulation_steps=2", "--lr_decay_iters=8", "--use_fsdp=True"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_train(tiny_args(char_dataset, straight, "--max_iters=8", *common), nproc=2))
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=4", *common), nproc=before))  # FSDP: torchrun even for 1
    assert not (split / "ckpt" / "rng_rank1.pt").exists() or before == 2
    first = losses(read_log(split))
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=8", "--init_from=resume", *common),
                 nproc=after))
    resumed = {**first, **losses(read_log(split))}
    ref = losses(read_log(straight))
    assert sorted(resumed) == list(range(8))
    for it in ref:
        assert resumed[it] == pytest.approx(ref[it], abs=1e-5), (it, resumed[it], ref[it])
