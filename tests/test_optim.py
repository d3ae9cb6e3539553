"""optim.py: parameter groups, per-group learning rates under the schedule, the non-finite skip."""

import os
import re

import pytest
import torch
from conftest import tiny_gpt
from test_train import _assert_clean_error, _same_weights, losses, ok, read_log, run_train, tiny_args

import checkpoint
import configurator
import loop
import optim
import parallel
import runlog

CPU = parallel.Dist(0, 0, 1, torch.device("cpu"))


def test_adamw_groups_and_scaled_learning_rates():
    """Decay on 2-D weights only; set_lr gives each group the schedule's lr times its lr_scale."""
    model = tiny_gpt()
    opt = optim.build_optimizer(model, CPU, zero1=False, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-6)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and opt.defaults["eps"] == 1e-6
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    no_decay["lr_scale"] = 0.5
    optim.set_lr(opt, 2e-3)
    assert decay["lr"] == 2e-3 and no_decay["lr"] == 1e-3
    del no_decay["lr_scale"]  # a group loaded from a checkpoint saved before groups had scales
    optim.set_lr(opt, 2e-3)
    assert no_decay["lr"] == 2e-3


@pytest.mark.parametrize("fused", [True, False])
def test_a_flagged_step_changes_nothing(fused):
    """found_inf=1 leaves weights and moments untouched (on device for the fused kernel); 0 steps."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(optim.param_groups(model, 0.1), lr=1e-2, fused=fused)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))[1].backward()
    before = [p.detach().clone() for p in model.parameters()]
    optim.step(opt, torch.ones(()))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    optim.step(opt, torch.zeros(()))
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# -----------------------------------------------------------------------------
# Muon


def newton_schulz_reference(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic Newton-Schulz iteration written out, one matrix, float64 (Keller Jordan's Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double()
    if X.shape[0] > X.shape[1]:
        X = X.T
    X = X / max(X.norm().item(), 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_orthogonalize_matches_a_written_out_newton_schulz():
    """The batched fp32 iteration against the float64 one, matrix by matrix, wide and tall."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 16, 48), (2, 48, 16), (1, 32, 32)):
        G = torch.randn(shape, generator=g)
        got = optim.orthogonalize(G, steps=5)
        for i in range(shape[0]):
            torch.testing.assert_close(got[i].double(), newton_schulz_reference(G[i], 5), atol=2e-5, rtol=0)
        s = torch.linalg.svdvals(got.double())
        assert s.max() < 1.3 and s.median() > 0.6  # about orthogonal (a square Gaussian's least ones lag)
        if shape[1] != shape[2]:
            assert s.min() > 0.5


def _muon_model():
    torch.manual_seed(0)
    return tiny_gpt(n_layer=2, n_embd=32)


def _batch(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    return model(x, y)[1]


@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_muon_adamw_equals_torch_muon_beside_torch_adamw(adjust_lr):
    """MuonAdamW over a model == torch.optim.Muon on the blocks' matrices + torch.optim.AdamW on the rest,
    with torch's bf16 Newton-Schulz, over 4 steps with changing learning rates."""
    ours_model, ref_model = _muon_model(), _muon_model()
    settings = optim.MuonSettings(lr_scale=2.0, momentum=0.9, ns_steps=5, adjust_lr=adjust_lr)
    ours = optim.build_optimizer(ours_model, CPU, zero1=False, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                 muon=settings)
    ours.param_groups[0]["ns_dtype"] = "bfloat16"  # torch.optim.Muon's dtype (ours is fp32 on CPU)
    named = list(ref_model.named_parameters())
    hidden = [p for n, p in named if n.startswith("h.") and p.dim() == 2]
    assert [id(p) for p in ours.param_groups[0]["params"]] == [id(p) for p in ours_model.parameters()
                                                               if p.dim() == 2 and p in set(ours.param_groups[0]["params"])]
    assert len(hidden) == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj of each block
    rest = [p for n, p in named if not (n.startswith("h.") and p.dim() == 2)]
    muon = torch.optim.Muon(hidden, lr=2e-3, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust_lr)
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.95), fused=True)
    for it, lr in enumerate((1e-3, 3e-3, 2e-3, 5e-4)):
        optim.set_lr(ours, lr)
        for group in muon.param_groups:
            group["lr"] = 2 * lr
        for group in adamw.param_groups:
            group["lr"] = lr
        _batch(ours_model, it).backward()
        _batch(ref_model, it).backward()
        optim.step(ours, torch.zeros(()))
        muon.step()
        adamw.step()
        ours.zero_grad()
        muon.zero_grad()
        adamw.zero_grad()
    for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(ours_model.h[0].mlp.c_fc.weight, _muon_model().h[0].mlp.c_fc.weight)


def test_muon_groups_and_a_flagged_step():
    """Blocks' 2-D weights on Muon, the rest on AdamW; found_inf=1 changes no weight and no state."""
    model = _muon_model()
    opt = optim.build_optimizer(model, CPU, zero1=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                muon=optim.MuonSettings())
    muon_group, decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon_group["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("h.") and p.dim() == 2)
    assert {names[id(p)] for p in decay["params"]} == {"wte.weight", "wpe.weight"}  # the head is tied to wte
    assert all(p.dim() == 1 for p in no_decay["params"])
    _batch(model, 0).backward()
    optim.step(opt, torch.zeros(()))
    _batch(model, 1).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    assert set(state[id(muon_group["params"][0])]) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(state[id(decay["params"][0])])
    optim.step(opt, torch.ones(()))
    assert all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
    assert all(torch.equal(v, opt.state[p][k]) for p in model.parameters() for k, v in state[id(p)].items())
    optim.step(opt, torch.zeros(()))
    assert not torch.equal(weights[2], list(model.parameters())[2])


def test_muon_resume_keeps_this_run_s_muon_settings():
    """load_state_dict restores the moments; the Muon keys and lr scales stay this run's."""
    model = _muon_model()
    opt = optim.build_optimizer(model, CPU, zero1=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                muon=optim.MuonSettings(lr_scale=3.0))
    _batch(model, 0).backward()
    optim.step(opt, torch.zeros(()))
    saved = opt.state_dict()
    again = optim.build_optimizer(model, CPU, zero1=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                  muon=optim.MuonSettings(lr_scale=1.5, ns_steps=3))
    again.load_state_dict(saved)
    assert again.param_groups[0]["lr_scale"] == 1.5 and again.param_groups[0]["ns_steps"] == 3
    p = again.param_groups[0]["params"][0]
    assert torch.equal(again.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])



class _RandomBatches:
    """loop.Loop's loader: a fresh random (2, 16) batch on every call."""

    def __init__(self) -> None:
        self.g = torch.Generator().manual_seed(0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 64, (2, 16), generator=self.g), torch.randint(0, 64, (2, 16), generator=self.g)


def test_the_loop_clips_every_gradient_before_muon_s_step():
    """loop.train_step with grad_clip=0.05 under MuonAdamW: after the first step each momentum is its clipped
    gradient times (1 - momentum) (Muon's buffer) or (1 - beta1) (AdamW's exp_avg), so together they have norm
    0.05 exactly, Muon's matrices holding a real part of it: clipping scaled every gradient, before the step."""
    model = _muon_model()
    opt = optim.build_optimizer(model, CPU, zero1=False, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                muon=optim.MuonSettings(momentum=0.95))
    steps = loop.Loop(CPU, model, model, opt, _RandomBatches(), runlog.RunLog("", False, {}), accum=2, max_iters=1,
                      lr_at=lambda it: 1e-2, evaluate_and_save=lambda run, done: None, save=lambda run: None,
                      grad_clip=0.05)
    step = loop.train_step(steps, loop.RunState())
    assert step.grad_norm > 1.0  # logged before clipping, well above the clip
    muon_group, *adamw_groups = opt.param_groups
    muon = [opt.state[p]["momentum_buffer"] / (1 - 0.95) for p in muon_group["params"]]
    adamw = [opt.state[p]["exp_avg"] / (1 - 0.9) for g in adamw_groups for p in g["params"]]
    norm = lambda ts: torch.linalg.vector_norm(torch.stack([t.norm() for t in ts])).item()  # noqa: E731
    assert norm(muon + adamw) == pytest.approx(0.05, rel=1e-5)
    assert 0.01 < norm(muon) < 0.05

# -----------------------------------------------------------------------------
# The warmup-stable-decay schedule


def test_wsd_schedule_boundaries():
    """Warmup as cosine's; the peak until the last 20% of lr_decay_iters; then linear or 1-sqrt to min_lr."""
    kw = dict(learning_rate=1e-3, warmup_iters=10, lr_decay_iters=110, min_lr=1e-4, schedule="wsd",
              decay_fraction=0.2)
    lr = loop.get_lr
    assert lr(0, **kw) == pytest.approx(1e-3 / 11)  # warmup starts above zero
    assert lr(9, **kw) == pytest.approx(1e-3 * 10 / 11)
    assert lr(10, **kw) == 1e-3  # end of warmup: the peak
    assert lr(50, **kw) == 1e-3 and lr(87, **kw) == 1e-3  # stable
    assert lr(88, **kw) == 1e-3  # decay starts at 110 - round(0.2 * 110) = 88, from the peak
    assert lr(99, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)  # mid-decay, linear
    assert lr(99, **kw, decay_shape="1-sqrt") == pytest.approx(1e-4 + (1 - 0.5**0.5) * 9e-4)
    assert lr(109, **kw) == pytest.approx(1e-4 + 9e-4 / 22)
    assert lr(110, **kw) == pytest.approx(1e-4) and lr(10_000, **kw) == pytest.approx(1e-4)  # the end, and past it
    decay = [lr(i, **kw, decay_shape="1-sqrt") for i in range(88, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert lr(99, **kw, decay_lr=False) == 1e-3
    # a decay longer than what follows warmup starts at the end of warmup
    assert lr(10, **{**kw, "decay_fraction": 1.0}) == 1e-3 and lr(60, **{**kw, "decay_fraction": 1.0}) == pytest.approx(
        1e-4 + 0.5 * 9e-4)


# -----------------------------------------------------------------------------
# Muon through train.py: every layout against one process, exact resume, refusals

MUON = ["--optimizer=muon", "--muon_lr_scale=2"]
# global batch: 2 sequences x 4 micro-steps (1 process) = 2 x 2 micro-steps x 2 processes
LAYOUT = ["--batch_size=2", "--gradient_accumulation_steps=4", "--max_iters=6", "--eval_interval=3",
          "--lr_decay_iters=9", *MUON]


def test_config_refuses_bad_optimizer_keys():
    for args, message in ((["--optimizer=sgd"], "optimizer='sgd' is not one of adamw, muon"),
                          (["--muon_adjust_lr=spectral"], "muon_adjust_lr='spectral' is not one of"),
                          (["--lr_schedule=linear"], "lr_schedule='linear' is not one of cosine, wsd"),
                          (["--lr_decay_shape=sqrt"], "lr_decay_shape='sqrt' is not one of linear, 1-sqrt"),
                          (["--lr_decay_fraction=0"], "lr_decay_fraction=0.0 must be in (0, 1]"),
                          (["--muon_ns_steps=0"], "muon_ns_steps=0 must be between 1 and 20"),
                          (["--muon_momentum=1"], "muon_momentum=1.0 must be in [0, 1)"),
                          (["--muon_ns_stepz=3"], "did you mean 'muon_ns_steps'"),
                          (["--optimizer=muon", "--use_cuda_graphs=True"], "optimizer=muon with use_cuda_graphs=True")):
        with pytest.raises(configurator.ConfigError, match=re.escape(message)):
            configurator.load_train(args)


@pytest.fixture(scope="module")
def muon_single(char_dataset, tmp_path_factory) -> dict:
    """LAYOUT's run in one process, continued to 9 steps (the resumes' reference)."""
    out = tmp_path_factory.mktemp("muon_single")
    ok(run_train(tiny_args(char_dataset, out, *LAYOUT, "--max_iters=9")))
    return read_log(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode, after", [("ddp", 0), ("zero1", 2), ("fsdp", 1)])
def test_muon_layouts_match_one_process_and_resume_across_layouts(mode, after, muon_single, char_dataset, tmp_path):
    """DDP, ZeRO-1 (each rank orthogonalises the matrices it owns) and FSDP2 (each matrix gathered whole)
    on 2 gloo processes against one process at the same global batch, gradient clipping acting on each: 6
    steps. Then the 2-process checkpoint resumed for 3 more steps on `after` processes (0: plain python;
    FSDP runs under torchrun even for 1), as AdamW's resumes go: DDP's optimizer.pt (the same on every rank)
    in one process, FSDP2's DCP folder (Muon's buffers as DTensor shards) resharded to 1 process, and
    ZeRO-1's optimizer_rank{r}.pt (each rank's Muon and AdamW state) refused in one process in one line,
    the checkpoint untouched, then resumed on 2. Losses and final weights follow the one-process run (measured:
    within 2.4e-7 and 3.1e-7 under each layout, 2-core CPU, torch 2.13)."""
    extra = {"ddp": [], "zero1": ["--use_zero1=True"], "fsdp": ["--use_fsdp=True"]}[mode]
    out = tmp_path / mode
    ok(run_train(tiny_args(char_dataset, out, *LAYOUT, *extra), nproc=2))
    log = read_log(out)
    ref, got = losses(muon_single), losses(log)
    assert sorted(got) == list(range(6))
    for it in got:
        assert got[it] == pytest.approx(ref[it], abs=1e-5), (it, got[it], ref[it])
    assert ref[5] < ref[0] - 0.5  # Muon trains
    # clipping's input (grad_clip=1.0, the default): the global gradient norm, logged before clipping, is above
    # the clip at 3+ steps and the same under each layout (FSDP's over every shard), so each clipped by the same
    # factor (test_the_loop_clips_every_gradient_before_muon_s_step: the clip reaches Muon's matrices)
    assert log["config"]["train"]["grad_clip"] == 1.0
    norms = {r["iter"]: r["grad_norm"] for r in log["training_iterations"]}
    ref_norms = {r["iter"]: r["grad_norm"] for r in muon_single["training_iterations"]}
    assert sum(norms[it] > 1.0 for it in norms) >= 3, norms
    assert all(norms[it] == pytest.approx(ref_norms[it], rel=1e-4) for it in norms), (norms, ref_norms)

    resume = tiny_args(char_dataset, out, *LAYOUT, "--max_iters=9", "--init_from=resume", *extra)
    if mode == "zero1":
        ckpt = out / "ckpt"
        files = {f: os.stat(ckpt / f).st_mtime_ns for f in os.listdir(ckpt)}
        assert {"optimizer_rank0.pt", "optimizer_rank1.pt"} <= set(files)
        _assert_clean_error(run_train(resume), "this ZeRO-1 checkpoint was saved by 2 processes and this run "
                                               "has 1; resume with --nproc_per_node=2")
        assert files == {f: os.stat(ckpt / f).st_mtime_ns for f in os.listdir(ckpt)}
    ok(run_train(resume, nproc=after))
    got = losses(read_log(out))
    assert sorted(got) == [6, 7, 8]
    for it in got:
        assert got[it] == pytest.approx(ref[it], abs=1e-5), (it, got[it], ref[it])
    mine = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    theirs = torch.load(os.path.join(muon_single["config"]["train"]["out_dir"], "ckpt", "model.pt"), weights_only=True)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.slow
def test_muon_compiled_matches_eager(muon_single, char_dataset, tmp_path):
    """--compile=True compiles the model (the optimizer step stays eager): Muon on the compiled model's
    gradients follows the eager curve. Measured: at most 4.8e-7 apart over the 6 steps (2-core CPU, torch
    2.13); the tolerance leaves 20x for other CPUs' kernels."""
    out = tmp_path / "compiled"
    p = ok(run_train(tiny_args(char_dataset, out, *LAYOUT, "--compile=True")))
    assert "compile=True" in p.stdout
    ref, got = losses(muon_single), losses(read_log(out))
    assert sorted(got) == list(range(6))
    for it in got:
        assert got[it] == pytest.approx(ref[it], abs=1e-5), (it, got[it], ref[it])


@pytest.mark.slow
def test_muon_kill_9_inside_a_save_resumes_bit_identical(char_dataset, tmp_path):
    """SIGKILL inside the 2nd save (iter 4): the checkpoint of iter 2 is intact, and the resume ends with the
    never-killed run's weights and losses, bit for bit (dropout on: the RNG is restored too)."""
    common = ["--max_iters=6", "--eval_interval=2", "--lr_decay_iters=6", "--dropout=0.1", *MUON]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    ok(run_train(tiny_args(char_dataset, straight, *common)))
    p = run_train(tiny_args(char_dataset, crashed, *common), env={"NANOLLM_CRASH_AT": "after_model:2:kill"})
    assert p.returncode != 0 and os.path.isdir(crashed / "ckpt.tmp")
    first = losses(read_log(crashed))
    assert checkpoint.read_state(checkpoint.find(str(crashed)))["iter_num"] == 2
    ok(run_train(tiny_args(char_dataset, crashed, *common, "--init_from=resume")))
    assert {**first, **losses(read_log(crashed))} == losses(read_log(straight))
    assert _same_weights(str(straight), str(crashed))


def test_resume_with_the_other_optimizer_is_one_line_and_keeps_the_checkpoint(char_dataset, tmp_path):
    out = tmp_path / "adamw"
    ok(run_train(tiny_args(char_dataset, out, "--max_iters=2", "--eval_interval=2")))
    before = {f: os.stat(os.path.join(out, "ckpt", f)).st_mtime_ns for f in os.listdir(out / "ckpt")}
    p = run_train(tiny_args(char_dataset, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume", *MUON))
    _assert_clean_error(p, "was trained with optimizer=adamw and this run asks for optimizer=muon; "
                           "resume with --optimizer=adamw")
    assert before == {f: os.stat(os.path.join(out, "ckpt", f)).st_mtime_ns for f in os.listdir(out / "ckpt")}


def test_muon_skips_a_non_finite_step(char_dataset, tmp_path, monkeypatch):
    """A NaN loss at steps 2 and 3 under Muon: both skipped on device and logged, the weights stay finite."""
    import model as model_module
    import train

    calls = {"n": 0}
    real_forward = model_module.GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in (3, 4):
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", poisoned)
    out = tmp_path / "nan"
    assert train.main(tiny_args(char_dataset, out, "--max_iters=6", "--eval_interval=100", *MUON)) == 0
    log = read_log(out)
    assert [e["iter"] for e in log["events"] if e["event"] == "skipped_nonfinite_step"] == [2, 3]
    weights = torch.load(out / "ckpt" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_dry_run_counts_muon_s_one_buffer(capsys):
    """Muon keeps one fp32 buffer for the blocks' matrices, AdamW two for every parameter."""
    import train
    from model import GPT

    preset = ["config/full_llama3_1.5b_optimal.py", "--dataset=no_such_dataset"]
    adamw = train.dry_run(*configurator.load_train(preset))
    tc, mc, explicit = configurator.load_train([*preset, "--optimizer=muon"])
    muon = train.dry_run(tc, mc, explicit)
    with torch.device("meta"):
        model = GPT(mc)
    n, n_muon = muon["n_params"], optim.muon_params(model)
    assert n_muon == sum(sum(p.numel() for p in m.parameters() if p.dim() == 2) for m in model.h)
    assert 0.5 * n < n_muon < n
    gib = 1024**3
    assert adamw["est_memory_breakdown_gb"]["optimizer_gb"] == pytest.approx(8 * n / gib, abs=1e-3)
    assert muon["est_memory_breakdown_gb"]["optimizer_gb"] == pytest.approx((8 * n - 4 * n_muon) / gib, abs=1e-3)
    assert "optimizer (muon)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_wsd_checkpoint_before_the_decay_continues_longer_exactly(char_dataset, tmp_path):
    """The README's recipe: a run planned for 8 iterations (decay over the last half) stopped at 4, before its
    decay, then resumed with --max_iters=12 --lr_decay_iters=12, is the run planned for 12 from the start."""
    common = ["--lr_schedule=wsd", "--lr_decay_fraction=0.5", "--eval_interval=4", *MUON]
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_train(tiny_args(char_dataset, straight, "--max_iters=12", "--lr_decay_iters=12", *common)))
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=4", "--lr_decay_iters=8", *common)))
    first = read_log(split)["training_iterations"]
    ok(run_train(tiny_args(char_dataset, split, "--max_iters=12", "--lr_decay_iters=12", "--init_from=resume", *common)))
    ref = read_log(straight)["training_iterations"]
    resumed = first + read_log(split)["training_iterations"]
    assert [(r["iter"], r["lr"], r["loss"]) for r in resumed] == [(r["iter"], r["lr"], r["loss"]) for r in ref]
    assert ref[6]["lr"] == 3e-3 and ref[11]["lr"] < ref[7]["lr"] < 3e-3  # the peak to 6, then the decay
