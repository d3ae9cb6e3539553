"""
Scaling-law planner: predicted loss of a model shape under a training-compute budget.

    python scaling_laws.py loss --params 1544628224 --tokens 101.909e9
    python scaling_laws.py plan --flops 1.36e21 --family llama3 [--chinchilla] [--top 5] [--out PATH]
    python scaling_laws.py plot --flops 1.36e21 --out docs/figures/scaling_loss_vs_params.png

The method (docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md):
- loss:   L(N, D) = E + A / N^alpha + B / D^beta, the parametric fit of Hoffmann et al. 2022
          (arXiv:2203.15556, Approach 3), N = all parameters (embeddings included), D = training tokens.
          --fit besiroglu uses the refit of Besiroglu et al. 2024 (arXiv:2404.10102) instead.
- tokens: D = C / flops_per_token, with model.py's count: 6 x (matmul weights, output head included,
          input embedding excluded) + 12 x n_layer x n_head x head_dim x seq_len. Not 6N.
- shapes: each family's grid of layers, width, heads, KV heads and FFN width (FAMILIES, GRIDS);
          parameters and FLOPs come from a closed form that tests/test_scaling_laws.py holds equal
          to GPT.num_params() and GPT.flops_per_token() of model.py.
- plan:   the shapes with the lowest predicted loss; --chinchilla keeps only D/N within 10% of 20.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import configurator
import errors

if TYPE_CHECKING:
    from model import ModelConfig


@dataclass(frozen=True)
class Fit:
    """Constants of L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str


FITS = {
    # Approach 3, the constants as printed in the paper; the training guide's predicted losses use these.
    "hoffmann": Fit(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022"),
    # Refit to data read off Hoffmann's Figure 4; its compute-optimal D/N is near 20 (Hoffmann's: ~50 at 1e21).
    "besiroglu": Fit(1.8172, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024"),
}

# Hoffmann et al.'s rule of thumb: about 20 training tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAM = 20.0
# --chinchilla keeps shapes with D/N in [18, 22]. One layer more or fewer moves D/N by about
# 2 / n_layer (8% at 24 layers) and width and FFN steps fall in between, so the band holds many shapes.
CHINCHILLA_TOLERANCE = 0.10
CHINCHILLA_BAND = f" with D/N within {CHINCHILLA_TOLERANCE:.0%} of {CHINCHILLA_TOKENS_PER_PARAM:g}"  # in plan headers


def predicted_loss(n_params: float, n_tokens: float, fit: Fit = FITS["hoffmann"]) -> float:
    """Predicted final training loss of a model with n_params parameters trained on n_tokens tokens."""
    if not (n_params > 0 and n_tokens > 0):
        raise errors.ConfigError(f"parameters ({n_params}) and tokens ({n_tokens}) must be > 0")
    return fit.E + fit.A / n_params**fit.alpha + fit.B / n_tokens**fit.beta


# -----------------------------------------------------------------------------
# Families and their grids of shapes


@dataclass(frozen=True)
class Family:
    """A preset family: the ModelConfig fields all its shapes share, and the rules its shapes follow."""

    features: dict[str, object]  # ModelConfig fields, the same as the family's presets in config/
    dataset: str  # the presets' dataset (tokenized with the family's tokenizer)
    head_dim: int
    width_multiple: int  # n_embd is a multiple of this
    kv_heads: tuple[int, ...]  # GQA choices of n_kv_head; () for multi-head attention
    query_widths: tuple[float, ...]  # choices of n_head * head_dim / n_embd (1: n_head = n_embd / head_dim)
    ffn_ratios: tuple[float, float]  # intermediate_size / n_embd, lowest and highest


_SWIGLU_RATIOS = (8 / 3, 3.5)  # LLaMA-2 rounds 8/3 up; LLaMA-3 uses 3.5, Qwen3 mostly 3

FAMILIES = {
    "gpt2": Family(
        features=dict(
            vocab_size=50304,
            norm="layernorm",
            norm_eps=1e-5,
            mlp="gelu",
            position_embedding="learned",
            bias=True,
            tie_embeddings=True,
        ),
        dataset="slimpajama_6b_gpt2",
        head_dim=64,
        width_multiple=128,
        kv_heads=(),
        query_widths=(1.0,),
        ffn_ratios=(4.0, 4.0),
    ),
    "llama2": Family(
        features=dict(
            vocab_size=32000,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            position_embedding="rope",
            rope_theta=10000.0,
            bias=False,
            tie_embeddings=False,
        ),
        dataset="slimpajama_6b_llama",
        head_dim=128,
        width_multiple=128,
        kv_heads=(),
        query_widths=(1.0,),
        ffn_ratios=_SWIGLU_RATIOS,
    ),
    "llama3": Family(
        features=dict(
            vocab_size=128256,
            norm="rmsnorm",
            norm_eps=1e-5,
            mlp="swiglu",
            position_embedding="rope",
            rope_theta=500000.0,
            bias=False,
            tie_embeddings=False,
        ),
        dataset="slimpajama_6b_llama3",
        head_dim=128,
        width_multiple=256,
        kv_heads=(2, 4, 8),
        query_widths=(1.0,),
        ffn_ratios=_SWIGLU_RATIOS,
    ),
    "qwen3": Family(
        features=dict(
            vocab_size=151936,
            norm="rmsnorm",
            norm_eps=1e-6,
            mlp="swiglu",
            position_embedding="rope",
            rope_theta=1000000.0,
            qk_norm=True,
            bias=False,
            tie_embeddings=False,
        ),
        dataset="slimpajama_6b_qwen3",
        head_dim=128,
        width_multiple=256,
        kv_heads=(2, 4, 8),
        query_widths=(1.0, 1.5, 2.0),  # Qwen3-1.7B/8B/14B: 1; Qwen3-4B/32B: 1.6; Qwen3-0.6B: 2
        ffn_ratios=_SWIGLU_RATIOS,
    ),
}

FFN_MULTIPLE = 256


@dataclass(frozen=True)
class Grid:
    """Bounds of the shape search: widths min_width..max_width, layers min_layers..max_layers."""

    min_width: int
    max_width: int
    min_layers: int
    max_layers: int
    min_aspect: int  # n_embd / n_layer bounds, see ASPECT below
    max_aspect: int


# n_embd / n_layer of real models: GPT-2 XL 33, Qwen3-0.6B 37, LLaMA-3 70B 102, LLaMA-3 8B 128.
# The loss fit knows N, not shape; the bound keeps it from trading depth for free embedding parameters.
ASPECT = (32, 128)

GRIDS = {
    "full": Grid(256, 8192, 2, 128, *ASPECT),
    "small": Grid(256, 768, 2, 8, *ASPECT),  # for tests: up to ~100 shapes per family
}


def shapes(family: Family, grid: Grid, seq_len: int) -> Iterator[ModelConfig]:
    """Every shape of the family on the grid, as a ModelConfig with block_size = seq_len."""
    # imported here, not at the top: model.py imports torch (~2 s), which `loss` and bad arguments skip
    from model import ModelConfig

    hd, step = family.head_dim, family.width_multiple
    for n_embd in range(-(-grid.min_width // step) * step, grid.max_width + 1, step):
        heads = [round(q * n_embd / hd) for q in family.query_widths if (q * n_embd / hd).is_integer()]
        if family.kv_heads:
            # GQA: each KV head serves a whole group of two or more query heads
            head_kv = [(h, kv) for h in heads for kv in family.kv_heads if h % kv == 0 and h > kv]
        else:
            head_kv = [(h, h) for h in heads]
        low, high = (r * n_embd for r in family.ffn_ratios)
        ffns = range(math.ceil(low / FFN_MULTIPLE) * FFN_MULTIPLE, math.floor(high) + 1, FFN_MULTIPLE)
        min_layers = max(grid.min_layers, math.ceil(n_embd / grid.max_aspect))
        max_layers = min(grid.max_layers, n_embd // grid.min_aspect)
        for n_layer in range(min_layers, max_layers + 1):
            for n_head, n_kv_head in head_kv:
                for intermediate_size in ffns:
                    yield ModelConfig(
                        block_size=seq_len,
                        n_layer=n_layer,
                        n_head=n_head,
                        n_kv_head=n_kv_head,
                        n_embd=n_embd,
                        head_dim=hd,
                        intermediate_size=intermediate_size,
                        **family.features,
                    )


# -----------------------------------------------------------------------------
# Parameters and FLOPs: closed forms of GPT.num_params() and GPT.flops_per_token()


def _matmul_weights(c: ModelConfig) -> int:
    """Weights of every nn.Linear, plus the tied output head: what flops_per_token multiplies by 6."""
    d, hd = c.n_embd, c.head_dim
    attn = d * (c.n_head + 2 * c.n_kv_head) * hd + c.n_head * hd * d  # c_attn (fused q, k, v), c_proj
    mlp = d * c.intermediate_size * (3 if c.gated_mlp else 2)  # gated (SwiGLU, GeGLU): gate, up, down
    return c.n_layer * (attn + mlp) + c.vocab_size * d  # + output head (tied or not)


def count_params(c: ModelConfig) -> int:
    """GPT(c).num_params() without building the model."""
    d, hd = c.n_embd, c.head_dim
    norm = d * (2 if c.norm == "layernorm" and c.bias else 1)
    per_layer = 2 * norm + (2 * hd if c.qk_norm else 0)
    if c.bias:
        per_layer += (c.n_head + 2 * c.n_kv_head) * hd + d  # c_attn, attn.c_proj
        per_layer += c.intermediate_size * (2 if c.gated_mlp else 1) + d  # c_fc, mlp.c_proj
    n = _matmul_weights(c) + c.n_layer * per_layer + norm  # + ln_f
    if not c.tie_embeddings:
        n += c.vocab_size * d  # wte; a tied head is wte itself, already in _matmul_weights
    if c.position_embedding == "learned":
        n += c.block_size * d
    return n


def count_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    """GPT(c).flops_per_token(seq_len) without building the model: training (forward + backward) FLOPs."""
    return 6 * _matmul_weights(c) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


# -----------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class Candidate:
    """One shape, evaluated under a budget."""

    config: ModelConfig
    n_params: int
    flops_per_token: int
    tokens: float
    loss: float


def evaluate(config: ModelConfig, flops: float, seq_len: int, fit: Fit) -> Candidate:
    """Tokens affordable under the budget and the predicted loss of one shape."""
    n = count_params(config)
    fpt = count_flops_per_token(config, seq_len)
    tokens = flops / fpt
    return Candidate(config, n, fpt, tokens, predicted_loss(n, tokens, fit))


def is_chinchilla(cand: Candidate) -> bool:
    """D/N within CHINCHILLA_TOLERANCE of 20 tokens per parameter."""
    ratio = cand.tokens / cand.n_params
    return abs(ratio / CHINCHILLA_TOKENS_PER_PARAM - 1) <= CHINCHILLA_TOLERANCE


def search(family: Family, flops: float, seq_len: int, fit: Fit, grid: Grid) -> Iterator[Candidate]:
    """Every shape of the grid, evaluated under the budget."""
    for config in shapes(family, grid, seq_len):
        yield evaluate(config, flops, seq_len, fit)


def plan(
    family: Family,
    flops: float,
    seq_len: int = 2048,
    fit: Fit = FITS["hoffmann"],
    grid: Grid = GRIDS["full"],
    chinchilla: bool = False,
    top: int = 5,
) -> tuple[list[Candidate], int]:
    """The top shapes by predicted loss, best first, and how many shapes were considered."""
    _check_budget(flops, seq_len)
    count = 0

    def considered() -> Iterator[Candidate]:
        nonlocal count
        for cand in search(family, flops, seq_len, fit, grid):
            if not chinchilla or is_chinchilla(cand):
                count += 1
                yield cand

    # Exact ties exist: 6 more KV heads add as many weights as 512 more FFN units (N and FLOPs equal);
    # they go to more KV heads, as LLaMA-3 and Qwen3 use 8.
    best = heapq.nsmallest(top, considered(), key=lambda c: (c.loss, -c.config.n_kv_head))
    return best, count


def _check_budget(flops: float, seq_len: int) -> None:
    if not (math.isfinite(flops) and flops > 0):
        raise errors.ConfigError(f"--flops must be a positive finite number, got {flops}")
    if seq_len <= 0:
        raise errors.ConfigError(f"--seq-len must be a positive integer, got {seq_len}")


# -----------------------------------------------------------------------------
# Output: table, config file, plot


def format_count(x: float) -> str:
    """158.19e9 -> '158.2B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def budget_tag(flops: float) -> str:
    """1.36e21 -> '1.36e21', 1e21 -> '1e21': the budget in file and directory names."""
    mantissa, exponent = f"{flops:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table(cands: list[Candidate]) -> str:
    """The candidates as an aligned text table, best first."""
    rows = [("rank", "shape", "params", "FLOPs/token", "tokens", "D/N", "loss")]
    for i, c in enumerate(cands, 1):
        rows.append(
            (
                str(i),
                c.config.arch_string,
                f"{c.n_params:,}",
                f"{c.flops_per_token:.4e}",
                format_count(c.tokens),
                f"{c.tokens / c.n_params:.1f}",
                f"{c.loss:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


# The training guide's presets' recipe (their 2x A6000 tuning runs), reused by planned configs.
BATCH_SIZE, GRADIENT_ACCUMULATION_STEPS = 8, 24
RECIPE = dict(learning_rate=3e-4, min_lr=3e-5, weight_decay=0.1, beta2=0.95, grad_clip=1.0)
WARMUP_ITERS = 2000
MODEL_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size")


def _literal(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def config_text(cand: Candidate, family_name: str, flops: float, seq_len: int, command: str,
                chinchilla: bool = False) -> str:
    """A config file like the presets in config/ that trains cand.config on its planned tokens. A
    --chinchilla plan gets an out_dir of its own, so the two plans of one budget never share a run folder."""
    c, family = cand.config, FAMILIES[family_name]
    tokens_per_step = BATCH_SIZE * GRADIENT_ACCUMULATION_STEPS * seq_len
    max_iters = math.ceil(cand.tokens / tokens_per_step)
    # the training guide's 2000 warmup steps, but never most of a short run (small budgets, tests)
    warmup_iters = min(WARMUP_ITERS, max_iters // 10)
    model_keys = list(MODEL_KEYS) + [k for k in family.features if k not in MODEL_KEYS]
    band = CHINCHILLA_BAND if chinchilla else ""
    lines = [
        f"# Planned by: {command}",
        f"# The lowest predicted loss among {family_name} shapes{band} for {budget_tag(flops)} training FLOPs:",
        f"# {c.arch_string}, {cand.n_params:,} parameters, {cand.flops_per_token:.4e} FLOPs per token",
        f"# (model.py: 6 x matmul weights + 12 x n_layer x n_head x head_dim x seq_len, seq_len {seq_len})",
        f"# -> {format_count(cand.tokens)} tokens, D/N {cand.tokens / cand.n_params:.1f}, "
        f"predicted loss {cand.loss:.4f} (docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md).",
        f'out_dir = "out-plan-{family_name}-{budget_tag(flops)}{"-chinchilla" if chinchilla else ""}"',
        f'dataset = "{family.dataset}"',
        "",
        "# model",
        *(f"{k} = {_literal(getattr(c, k))}" for k in model_keys),
        "",
        f"# batch: {BATCH_SIZE} x {GRADIENT_ACCUMULATION_STEPS} x {seq_len} = {tokens_per_step:,} tokens per step "
        "(the training guide's; fit batch_size to memory and keep the product)",
        f"block_size = {seq_len}",
        f"batch_size = {BATCH_SIZE}",
        f"gradient_accumulation_steps = {GRADIENT_ACCUMULATION_STEPS}",
        "",
        f"# optimizer and schedule: max_iters steps cover the planned {format_count(cand.tokens)} tokens",
        *(f"{k} = {_literal(v)}" for k, v in RECIPE.items()),
        f"warmup_iters = {warmup_iters}",
        f"max_iters = {max_iters}",
        f"lr_decay_iters = {max_iters}",
    ]
    return "\n".join(lines) + "\n"


# The training guide's three predicted losses at its own N and D, drawn on the plot next to ours.
GUIDE_PREDICTIONS = (
    ("config/full_llama3_1.5b_optimal.py", 101.909e9, 2.335, "LLaMA-3 1.5B"),
    ("config/full_llama3_2.2b_chinchilla.py", 61.545e9, 2.351, "LLaMA-3 2.2B"),
    ("config/full_qwen3_1.8b_optimal.py", 81.727e9, 2.340, "Qwen3 1.8B"),
)


def plot(flops: float, out: str, seq_len: int, fit: Fit, grid: Grid) -> None:
    """Predicted loss against parameters at a fixed budget: the best shape of each family per size bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_budget(flops, seq_len)
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=100)
    lowest_n, highest_n = math.inf, 0.0
    for name, family in FAMILIES.items():
        cands = list(search(family, flops, seq_len, fit, grid))
        # lower envelope: the best shape in each of 60 log-spaced parameter bins
        lo, hi = min(c.n_params for c in cands), max(c.n_params for c in cands)
        lowest_n, highest_n = min(lowest_n, lo), max(highest_n, hi)
        bins: dict[int, Candidate] = {}
        for c in cands:
            b = min(59, int(60 * math.log(c.n_params / lo) / math.log(hi / lo)))
            if b not in bins or c.loss < bins[b].loss:
                bins[b] = c
        envelope = [bins[b] for b in sorted(bins)]
        (line,) = ax.plot([c.n_params for c in envelope], [c.loss for c in envelope], label=name)
        best = min(cands, key=lambda c: c.loss)
        ax.plot(best.n_params, best.loss, "*", ms=11, color=line.get_color())
    ns = [lowest_n * (highest_n / lowest_n) ** (i / 200) for i in range(201)]
    ax.plot(ns, [predicted_loss(n, flops / (6 * n), fit) for n in ns], "k--", lw=1, label="D = C / 6N")
    ax.plot([], [], "ko", mfc="none", label="the guide's shapes at our D")
    ax.plot([], [], "kx", label="the guide's shapes at its D (its loss):")
    for i, (path, guide_tokens, guide_loss, label) in enumerate(GUIDE_PREDICTIONS, 1):
        _, model_cfg, _ = configurator.load_train([path])
        ours = evaluate(model_cfg, flops, seq_len, fit)
        ax.plot(ours.n_params, ours.loss, "ko", ms=5, mfc="none")
        ax.plot(ours.n_params, guide_loss, "kx", ms=6)
        ax.annotate(str(i), (ours.n_params, guide_loss), fontsize=8, xytext=(0, 5), textcoords="offset points")
        ax.plot([], [], " ", label=f"  {i}: {label}, D {guide_tokens / 1e9:.1f}B, L {guide_loss:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(1e8, 3e10)
    ax.set_ylim(2.27, 2.47)
    ax.set_xlabel("parameters N (embeddings included)")
    ax.set_ylabel("predicted loss L(N, D = C / FLOPs per token)")
    ax.set_title(
        f"Best shape per size at C = {budget_tag(flops)} FLOPs ({fit.source} fit; star: best)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The loss, plan and plot commands and their options."""
    parser = errors.ArgumentParser(prog="scaling_laws.py", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=errors.ArgumentParser)

    loss = commands.add_parser("loss", help="predicted loss of N parameters trained on D tokens")
    loss.add_argument("--params", type=_positive_number, required=True, help="N, all parameters")
    loss.add_argument("--tokens", type=_positive_number, required=True, help="D, training tokens")
    loss.add_argument("--fit", choices=FITS, default="hoffmann", help="the fitted loss law L(N, D)")

    def budget_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--flops", type=_positive_number, required=True, help="training FLOPs budget C")
        p.add_argument("--seq-len", "--seq_len", dest="seq_len", type=_positive_int, default=2048,
                       help="training sequence length (attention FLOPs)")
        p.add_argument("--fit", choices=FITS, default="hoffmann", help="the fitted loss law L(N, D)")
        p.add_argument("--grid", choices=GRIDS, default="full", help="'small' is for tests")

    p = commands.add_parser("plan", help="grid-search shapes of a family under a FLOPs budget")
    budget_args(p)
    p.add_argument("--family", choices=FAMILIES, required=True, help="the architecture whose shapes are searched")
    p.add_argument("--chinchilla", action="store_true", help="only shapes with D/N within 10%% of 20")
    p.add_argument("--top", type=_positive_int, default=5, help="how many shapes to print")
    p.add_argument("--out", help="config file for the best shape (default: config/plan_FAMILY_FLOPS.py)")

    p = commands.add_parser("plot", help="plot predicted loss against parameters for every family")
    budget_args(p)
    p.add_argument("--out", default="docs/figures/scaling_loss_vs_params.png", help="the PNG to write")
    return parser


def _command_line(args: argparse.Namespace) -> str:
    """The plan command that reproduces args, for the header of the written config."""
    cmd = f"python scaling_laws.py plan --flops {budget_tag(args.flops)} --family {args.family}"
    if args.chinchilla:
        cmd += " --chinchilla"
    for flag, value, default in (
        ("--seq-len", args.seq_len, 2048),
        ("--fit", args.fit, "hoffmann"),
        ("--grid", args.grid, "full"),
    ):
        if value != default:
            cmd += f" {flag} {value}"
    return cmd


def grid_edges(c: ModelConfig, family: Family, grid: Grid) -> list[str]:
    """Notes on the grid bounds a shape touches: a best shape there may not be the fit's optimum."""
    notes = []
    if c.n_embd - family.width_multiple < grid.min_width or c.n_embd + family.width_multiple > grid.max_width:
        notes.append(f"n_embd {c.n_embd} is at the edge of the grid's widths; a larger grid may do better")
    if c.n_layer in (grid.min_layers, grid.max_layers):
        notes.append(f"n_layer {c.n_layer} is at the edge of the grid's depths; a larger grid may do better")
    if c.n_embd / max(c.n_layer - 1, 1) > grid.max_aspect or c.n_embd / (c.n_layer + 1) < grid.min_aspect:
        # expected: at fixed N, wider shapes have more embedding parameters, which cost no FLOPs
        notes.append(
            f"n_embd / n_layer = {c.n_embd / c.n_layer:.0f} is at the aspect bounds "
            f"[{grid.min_aspect}, {grid.max_aspect}], which the fit alone would leave"
        )
    return notes


def run_plan(args: argparse.Namespace) -> None:
    """Search, print the top shapes and write the best one as a config file."""
    family, grid = FAMILIES[args.family], GRIDS[args.grid]
    out = args.out
    if out is None:
        suffix = "_chinchilla" if args.chinchilla else ""
        out = os.path.join("config", f"plan_{args.family}_{budget_tag(args.flops)}{suffix}.py")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise errors.ConfigError(f"cannot write {out}: no directory {os.path.dirname(out)}")
    best, count = plan(family, args.flops, args.seq_len, FITS[args.fit], grid, args.chinchilla, args.top)
    which = f"{args.family} shapes on the {args.grid} grid"
    if args.chinchilla:
        which += CHINCHILLA_BAND
    if not best:
        raise errors.ConfigError(f"no {which} at {budget_tag(args.flops)} FLOPs")
    print(f"{count:,} {which}, {budget_tag(args.flops)} FLOPs, seq_len {args.seq_len}, fit {args.fit}")
    print(
        "tokens = FLOPs / FLOPs per token (model.py: 6 x matmul weights + 12 x n_layer x n_head x head_dim x seq_len)"
    )
    print(table(best))
    for note in grid_edges(best[0].config, family, grid):
        print(f"note: {note}")
    with open(out, "w") as f:
        f.write(config_text(best[0], args.family, args.flops, args.seq_len, _command_line(args), args.chinchilla))
    print(f"wrote {out} (python train.py {out})")


def main(argv: list[str]) -> int:
    """Run one command; returns the exit status (2 and one `error:` line for bad input)."""
    return errors.run_command(lambda: run(build_parser().parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    if args.command == "loss":
        fit = FITS[args.fit]
        loss = predicted_loss(args.params, args.tokens, fit)
        print(
            f"{loss:.4f}  predicted loss of N = {args.params:,.0f} parameters trained on "
            f"D = {args.tokens:,.0f} tokens (D/N {args.tokens / args.params:.1f}, fit {args.fit})"
        )
    elif args.command == "plan":
        run_plan(args)
    else:
        plot(args.flops, args.out, args.seq_len, FITS[args.fit], GRIDS[args.grid])
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
