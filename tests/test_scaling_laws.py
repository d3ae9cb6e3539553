"""scaling_laws.py: the training guide's predicted losses, plan against a brute force, closed-form counts, CLI."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import configurator
import scaling_laws as sl
import train
from model import GPT, ModelConfig
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The training guide's figures for a 1.36e21 FLOPs budget (the source document): preset, N, D, predicted loss.
SEED = [
    ("full_llama3_1.5b_optimal", 1_544_628_224, 101.909e9, 2.335),
    ("full_llama3_2.2b_chinchilla", 2_224_154_624, 61.545e9, 2.351),
    ("full_qwen3_1.8b_optimal", 1_830_395_904, 81.727e9, 2.340),
]

# The preset that defines each family's features (vocabulary, norm, MLP, positions, ...).
FAMILY_PRESET = {
    "gpt2": "full_gpt2_1.36b",
    "llama2": "full_llama_1.36b",
    "llama3": "full_llama3_1.5b_optimal",
    "qwen3": "full_qwen3_1.8b_optimal",
}
SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size")


def _preset(name: str) -> ModelConfig:
    (_, cfg), _ = configurator.load([os.path.join(ROOT, "config", f"{name}.py")], [TrainConfig, ModelConfig])
    return cfg


_COUNTS: dict[tuple, tuple[int, int]] = {}


def _model_counts(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(num_params, flops_per_token) of model.py's GPT built on the meta device, cached per shape."""
    key = (dataclasses.astuple(cfg), seq_len)
    if key not in _COUNTS:
        with torch.device("meta"):
            m = GPT(cfg)
        _COUNTS[key] = (m.num_params(), m.flops_per_token(seq_len))
    return _COUNTS[key]


def _shape(cfg: ModelConfig) -> tuple[int, ...]:
    return tuple(getattr(cfg, k) for k in SHAPE_KEYS)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scaling_laws.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


# -----------------------------------------------------------------------------
# The training guide's predicted losses


@pytest.mark.parametrize("preset, n_params, tokens, loss", SEED)
def test_guide_losses_to_three_decimals(preset, n_params, tokens, loss):
    cfg = _preset(preset)
    n, _ = _model_counts(cfg, 2048)
    assert n == n_params == sl.count_params(cfg)
    assert round(sl.predicted_loss(n, tokens), 3) == loss


@pytest.mark.parametrize("preset, n_params, tokens, loss", SEED)
def test_loss_cli_prints_guide_loss(preset, n_params, tokens, loss):
    result = _run_cli("loss", "--params", str(n_params), "--tokens", f"{tokens:.6e}")
    assert result.returncode == 0, result.stderr
    assert round(float(result.stdout.split()[0]), 3) == loss


def test_besiroglu_fit_is_selectable_and_differs():
    n, d = SEED[0][1], SEED[0][2]
    hoffmann, besiroglu = (
        sl.predicted_loss(n, d, sl.FITS["hoffmann"]),
        sl.predicted_loss(n, d, sl.FITS["besiroglu"]),
    )
    assert besiroglu != hoffmann
    result = _run_cli("loss", "--params", str(n), "--tokens", str(d), "--fit", "besiroglu")
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[0]) == pytest.approx(besiroglu, abs=5e-5)


# -----------------------------------------------------------------------------
# Families and the closed-form counts


@pytest.mark.parametrize("family", sorted(sl.FAMILIES))
def test_family_features_match_presets(family):
    path = os.path.join(ROOT, "config", f"{FAMILY_PRESET[family]}.py")
    preset = configurator.read_config_file(path)
    for key, value in sl.FAMILIES[family].features.items():
        assert getattr(_preset(FAMILY_PRESET[family]), key) == value, key
    assert sl.FAMILIES[family].dataset == preset["dataset"]


def test_closed_form_equals_model_on_every_config_file():
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        cfg = _preset(name.removesuffix(".py"))
        for seq_len in (cfg.block_size, 2048):
            counts = (sl.count_params(cfg), sl.count_flops_per_token(cfg, seq_len))
            assert counts == _model_counts(cfg, seq_len), name


@pytest.mark.parametrize("family", sorted(sl.FAMILIES))
def test_closed_form_equals_model_on_full_grid_shapes(family):
    """Shapes of the full grid at widths drawn up to 8192, each with its fewest layers (meta builds are slow)."""
    rng = random.Random(0)
    fam, grid = sl.FAMILIES[family], sl.GRIDS["full"]
    widths = list(range(512, grid.max_width + 1, fam.width_multiple))
    picked = []
    for width in rng.sample(widths, 4):
        fewest_layers = -(-width // grid.max_aspect)
        narrow = dataclasses.replace(grid, min_width=width, max_width=width, max_layers=fewest_layers)
        options = list(sl.shapes(fam, narrow, 2048))
        picked += rng.sample(options, min(2, len(options)))
    assert len(picked) >= 4
    for cfg in picked:
        assert (sl.count_params(cfg), sl.count_flops_per_token(cfg, 2048)) == _model_counts(cfg, 2048)


def test_closed_form_equals_model_on_random_features():
    """Every feature combination (bias, tying, norms, MLPs, positions, GQA, QK-norm, free head_dim)."""
    rng = random.Random(1)
    for _ in range(40):
        n_kv_head = rng.choice([1, 2, 3])
        cfg = ModelConfig(
            vocab_size=rng.choice([96, 1000, 5003]),
            block_size=rng.choice([64, 256]),
            n_layer=rng.randint(1, 3),
            n_head=n_kv_head * rng.choice([1, 2, 3]),
            n_kv_head=n_kv_head,
            n_embd=rng.choice([48, 96, 160]),
            head_dim=rng.choice([16, 24, 32]),
            intermediate_size=rng.choice([64, 200, 384]),
            norm=rng.choice(["layernorm", "rmsnorm"]),
            mlp=rng.choice(["gelu", "swiglu"]),
            position_embedding=rng.choice(["learned", "rope"]),
            qk_norm=rng.choice([False, True]),
            bias=rng.choice([False, True]),
            tie_embeddings=rng.choice([False, True]),
        )
        seq_len = rng.choice([1, 64, 4096])
        assert (sl.count_params(cfg), sl.count_flops_per_token(cfg, seq_len)) == _model_counts(cfg, seq_len)


# -----------------------------------------------------------------------------
# plan against a brute force written from the grid rules (docs), not from scaling_laws.shapes

SMALL_GRID_RULES = {
    # head_dim, n_embd multiple, KV-head choices (None: MHA), n_head * head_dim / n_embd choices (x2), MLP
    "gpt2": (64, 128, None, (2,), "gelu"),
    "llama2": (128, 128, None, (2,), "swiglu"),
    "llama3": (128, 256, (2, 4, 8), (2,), "swiglu"),
    "qwen3": (128, 256, (2, 4, 8), (2, 3, 4), "swiglu"),
}
# Budgets at which every family has shapes with D/N within 10% of 20 on the small grid.
SMALL_BUDGETS = {"gpt2": 1e18, "llama2": 1e18, "llama3": 2e18, "qwen3": 2e18}


def _brute_force(family: str, flops: float, chinchilla: bool) -> dict[tuple[int, ...], float]:
    """Predicted loss of every shape of the small grid: widths 256-768, 2-8 layers, 32 <= width/layers <= 128."""
    head_dim, step, kv_choices, twice_query_widths, mlp = SMALL_GRID_RULES[family]
    base = _preset(FAMILY_PRESET[family])
    losses = {}
    for n_embd in range(step, 769, step):
        if n_embd < 256:
            continue
        for n_layer in range(2, 9):
            if not 32 * n_layer <= n_embd <= 128 * n_layer:
                continue
            for n_head in range(1, 2 * n_embd // head_dim + 1):
                if 2 * n_head * head_dim not in [q * n_embd for q in twice_query_widths]:
                    continue
                kvs = (
                    [n_head]
                    if kv_choices is None
                    else [k for k in kv_choices if n_head % k == 0 and k < n_head]
                )
                if mlp == "gelu":
                    ffns = [4 * n_embd]
                else:
                    ffns = [
                        f for f in range(256, 4 * n_embd, 256) if 3 * f >= 8 * n_embd and 2 * f <= 7 * n_embd
                    ]
                for n_kv_head in kvs:
                    for ffn in ffns:
                        cfg = dataclasses.replace(
                            base,
                            n_layer=n_layer,
                            n_head=n_head,
                            n_kv_head=n_kv_head,
                            n_embd=n_embd,
                            head_dim=head_dim,
                            intermediate_size=ffn,
                            block_size=2048,
                        )
                        n, fpt = _model_counts(cfg, 2048)
                        tokens = flops / fpt
                        if chinchilla and not 18 <= tokens / n <= 22:
                            continue
                        losses[_shape(cfg)] = sl.predicted_loss(n, tokens)
    return losses


@pytest.mark.parametrize("chinchilla", [False, True])
@pytest.mark.parametrize("family", sorted(sl.FAMILIES))
def test_plan_finds_brute_force_minimum(family, chinchilla):
    flops = SMALL_BUDGETS[family]
    losses = _brute_force(family, flops, chinchilla)
    assert losses, "the brute force found no shape"
    best, count = sl.plan(sl.FAMILIES[family], flops, grid=sl.GRIDS["small"], chinchilla=chinchilla, top=3)
    assert count == len(losses)
    lowest = min(losses.values())
    assert best[0].loss == pytest.approx(lowest, rel=1e-12)
    assert losses[_shape(best[0].config)] == pytest.approx(lowest, rel=1e-12)
    assert [c.loss for c in best] == sorted(losses.values())[:3]
    if chinchilla:
        assert all(18 <= c.tokens / c.n_params <= 22 for c in best)


# -----------------------------------------------------------------------------
# The written config


@pytest.mark.parametrize("family", sorted(sl.FAMILIES))
def test_plan_writes_config_that_loads(family, tmp_path, capsys):
    out = str(tmp_path / f"plan_{family}.py")
    flops = SMALL_BUDGETS[family]
    assert sl.main(["plan", "--flops", str(flops), "--family", family, "--grid", "small", "--out", out]) == 0
    printed = capsys.readouterr().out
    (train_cfg, model_cfg), _ = configurator.load([out], [TrainConfig, ModelConfig])
    (best,), _ = sl.plan(sl.FAMILIES[family], flops, grid=sl.GRIDS["small"], top=1)
    n, _ = _model_counts(model_cfg, train_cfg.block_size)
    assert n == best.n_params
    assert _shape(model_cfg) == _shape(best.config)
    rank_one = next(line for line in printed.splitlines() if line.startswith("1 "))
    assert f"{n:,}" in rank_one
    tokens_per_step = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * train_cfg.block_size
    assert (train_cfg.max_iters - 1) * tokens_per_step < best.tokens <= train_cfg.max_iters * tokens_per_step
    assert train_cfg.warmup_iters < train_cfg.max_iters
    # train.py's dry run loads it and reports the same parameter count
    assert train.main([out, "--dry_run=True"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_params"] == n


def test_plan_and_its_chinchilla_variant_get_different_out_dirs(tmp_path, capsys):
    """The two plans of one budget are two runs: sharing an out_dir, the second would be refused (or resume the
    first). The committed plan configs are what plan writes, so they must differ too."""
    flops, out_dirs = SMALL_BUDGETS["llama3"], {}
    for chinchilla in (False, True):
        out = str(tmp_path / f"plan_{chinchilla}.py")
        args = ["plan", "--flops", str(flops), "--family", "llama3", "--grid", "small", "--out", out]
        assert sl.main(args + ["--chinchilla"] * chinchilla) == 0
        (train_cfg, _), _ = configurator.load([out], [TrainConfig, ModelConfig])
        out_dirs[chinchilla] = train_cfg.out_dir
    capsys.readouterr()
    tag = sl.budget_tag(flops)
    assert out_dirs == {False: f"out-plan-llama3-{tag}", True: f"out-plan-llama3-{tag}-chinchilla"}
    committed = [os.path.join(ROOT, "config", f"plan_llama3_1.36e21{s}.py") for s in ("", "_chinchilla")]
    loaded = [configurator.load([path], [TrainConfig, ModelConfig])[0][0].out_dir for path in committed]
    assert loaded == ["out-plan-llama3-1.36e21", "out-plan-llama3-1.36e21-chinchilla"]


# -----------------------------------------------------------------------------
# Command-line errors: one line on stderr, nonzero exit, no traceback


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--flops", "-1e21", "--family", "llama3"], "argument --flops: expected one argument"),
        (["plan", "--flops", "0", "--family", "llama3"], "--flops: '0' must be a positive finite number"),
        (["plan", "--flops", "lots", "--family", "qwen3"], "--flops: 'lots' is not a number"),
        (["plan", "--flops", "nan", "--family", "qwen3"], "--flops: 'nan' must be a positive finite number"),
        (["plan", "--flops", "1e21", "--family", "gpt5"], "--family: invalid choice: 'gpt5'"),
        (["plan", "--flops", "1e21", "--family", "llama3", "--seq-len", "0"], "'0' must be a positive integer"),
        (["loss", "--params", "1.5B", "--tokens", "1e11"], "--params: '1.5B' is not a number"),
        (["loss", "--params", "1.5e9", "--tokens", "-1"], "--tokens: '-1' must be a positive finite number"),
        (["plot", "--flops", "inf"], "--flops: 'inf' must be a positive finite number"),
        ([], "the following arguments are required: command"),
        (["plan", "--flops", "1e18", "--family", "gpt2", "--grid", "small", "--out", "/nonexistent/dir/x.py"],
         "cannot write /nonexistent/dir/x.py: no directory /nonexistent/dir"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = _run_cli(*args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_plan_with_no_shape_in_the_chinchilla_band_is_an_error(capsys):
    # in-process: this error comes after the search, which imports torch (a subprocess would take ~2 s)
    args = ["plan", "--flops", "1e25", "--family", "llama3", "--grid", "small", "--chinchilla"]
    assert sl.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no llama3 shapes") and captured.err.count("\n") == 1


DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md")


def _plan_output(argv: list[str], tmp_path, capsys) -> list[str]:
    """The lines `scaling_laws.py plan ARGV` prints, its config written under tmp_path."""
    capsys.readouterr()
    assert sl.main([*argv, "--out", str(tmp_path / "plan.py")]) == 0
    return capsys.readouterr().out.splitlines()


def test_the_docs_plan_tables_and_ranks_are_what_plan_prints(tmp_path, capsys):
    """Drift: each `plan` command in the scaling-law doc is run and its printed table must be the doc's, line
    for line (the config path aside); the guide's shapes rank where the doc says. Planted: one changed
    digit in a copy of the doc's table, or the rank 296th, fails."""
    import re

    text = open(DOC).read()
    blocks = re.findall(r"```bash\n\.venv/bin/python scaling_laws\.py (plan [^\n]*)\n```\n\n```\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "the doc's plan commands and their outputs"
    for command, shown in blocks:
        got = [line for line in _plan_output(command.split(), tmp_path, capsys) if not line.startswith("wrote ")]
        doc = [line for line in shown.splitlines() if not line.startswith("wrote ")]
        assert got == doc, command
        planted = doc[3][:-1] + str((int(doc[3][-1]) + 1) % 10)  # the first row's loss, last digit changed
        assert [*doc[:3], planted] != got[:4]
    ranked = {"llama3": "18L-16H-2048D-7168ff GQA(8kv)", "qwen3": "24L-16H-2048D-6144ff GQA(8kv)"}
    for family, shape in ranked.items():
        lines = _plan_output(["plan", "--flops", "1.36e21", "--family", family, "--top", "400"], tmp_path, capsys)
        total = lines[0].split()[0]
        (row,) = [line.split() for line in lines if shape in line]
        rank, loss = int(row[0]), row[-1]
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(rank % 10 if rank % 100 not in (11, 12, 13) else 0, "th")
        claim = f"ranks {rank}{suffix} of {total} at {loss}"
        assert claim in " ".join(text.split()), claim
    assert "ranks 296th of 178,939" not in text
