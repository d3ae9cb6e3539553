"""
Recipes for torchtitan 0.2.2 and Megatron-LM core_r0.13.0, generated from one of our presets.

    python -m recipes torchtitan config/full_llama3_1.5b_optimal.py --ngpu 8 --out recipes_out/tt
    python -m recipes megatron config/full_llama3_1.5b_optimal.py --ngpu 8 --data data/shakespeare --out recipes_out/mg
    python -m recipes megatron-data data/shakespeare
    python -m recipes validate recipes_out/tt

The preset is the single source of truth: shapes, vocabulary, batch and schedule come from it.
Every bad input is one `error:` line and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess

import tomllib

import atomic
import configurator
import errors
import families
from errors import UserError
from model import ModelConfig
from recipes import megatron_data
from token_loader import DataError, read_meta, resolve_data_dir, vocab_mismatch
from train_config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TORCHTITAN_VERSION = "0.2.2"
MEGATRON_TAG = "core_r0.13.0"
FLAVOR_MODULE = "nanollm_titan"  # the generated [experimental] custom_import module
PLACEHOLDER = re.compile(r"(?<!\$)\{[A-Z][A-Z0-9_]+\}")  # a template's {NAME}, not bash ${NAME}


class RecipeError(UserError):
    """Bad input for a recipe: one line naming the problem and the fix."""


def load_preset(path: str) -> tuple[TrainConfig, ModelConfig]:
    """Our typed configs from a preset file (with its checks), or RecipeError."""
    if not os.path.isfile(path):
        raise RecipeError(f"unknown preset {path}: no such file; pass one of config/*.py")
    try:
        tc, mc, _ = configurator.load_train([path])
    except errors.ConfigError as e:
        raise RecipeError(f"preset {path}: {e}") from None
    return tc, mc


def data_parallel(ngpu: int, tp: int, pp: int, cp: int, replicate: int = 1, shard: int = -1) -> tuple[int, int]:
    """(dp_replicate, dp_shard) with shard=-1 filled in; RecipeError when the degrees do not multiply to ngpu."""
    for name, v in (("ngpu", ngpu), ("tp", tp), ("pp", pp), ("cp", cp), ("dp_replicate", replicate)):
        if v < 1:
            raise RecipeError(f"--{name}={v} must be a positive integer")
    rest = tp * pp * cp * replicate
    if shard == -1:
        if ngpu % rest:
            raise RecipeError(f"tp*pp*cp*dp_replicate = {rest} does not divide --ngpu={ngpu}; choose degrees whose "
                              "product divides the GPU count")
        shard = ngpu // rest
    if shard < 1 or rest * shard != ngpu:
        raise RecipeError(f"degrees dp_replicate={replicate} x dp_shard={shard} x tp={tp} x pp={pp} x cp={cp} = "
                          f"{rest * max(shard, 0)} but --ngpu={ngpu}; they must multiply to the GPU count")
    return replicate, shard


def check_heads(mc: ModelConfig, tp: int) -> None:
    if mc.n_head % tp or mc.n_kv_head % tp:
        raise RecipeError(f"n_head={mc.n_head} and n_kv_head={mc.n_kv_head} must both be divisible by --tp={tp}; "
                          "use a tensor-parallel degree that divides the KV heads")


def check_fp8(mc: ModelConfig) -> None:
    """FP8 GEMMs need every matmul dimension to be a multiple of 16."""
    dims = {"n_embd": mc.n_embd, "intermediate_size": mc.intermediate_size, "vocab_size": mc.vocab_size,
            "n_head*head_dim": mc.n_head * mc.head_dim, "n_kv_head*head_dim": mc.n_kv_head * mc.head_dim}
    bad = [f"{k}={v}" for k, v in dims.items() if v % 16]
    if bad:
        raise RecipeError(f"FP8 needs GEMM dimensions that are multiples of 16, but {', '.join(bad)}; "
                          "drop the FP8 flag or change the shape")


def check_batch(tc: TrainConfig, dp: int) -> tuple[int, int]:
    """(micro batch, global batch) in sequences: our batch_size and batch_size * gradient_accumulation_steps."""
    micro, glob = tc.batch_size, tc.batch_size * tc.gradient_accumulation_steps
    if glob % (micro * dp):
        raise RecipeError(f"global batch {glob} (batch_size x gradient_accumulation_steps) is not divisible by "
                          f"batch_size {micro} x data-parallel degree {dp}; change --ngpu or the degrees")
    return micro, glob


def vocab_divisor(vocab_size: int, tp: int) -> int:
    """Largest d <= 128 (a power of two) with vocab_size % (d * tp) == 0, so Megatron does not pad the vocabulary."""
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if vocab_size % (d * tp) == 0:
            return d
    raise RecipeError(f"vocab_size={vocab_size} is not divisible by --tp={tp}, so Megatron would pad it; "
                      "choose a tensor-parallel degree that divides the vocabulary")


def llama_ffn(dim: int, hidden: int) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) for which torchtitan's llama3 FeedForward width equals `hidden`."""
    base = int(2 * 4 * dim / 3)
    multiple_of = math.gcd(hidden, 1024)
    for k in range(10, 1000):
        m = k / 100
        if titan_ffn_width(dim, m, multiple_of) == hidden:
            return m, multiple_of
    m = hidden / base
    assert titan_ffn_width(dim, m, hidden) == hidden
    return m, hidden


def titan_ffn_width(dim: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """torchtitan llama3's FeedForward width (int(8d/3), times the multiplier, rounded up to multiple_of)."""
    hidden = int(2 * 4 * dim / 3)
    hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def titan_family(mc: ModelConfig) -> str:
    """torchtitan model family from the preset's features (never its name): its family's titan (families.py)."""
    family = next((f for f in families.FAMILIES.values() if f.matches(mc)), None)
    if family is None or family.titan is None or mc.bias:  # torchtitan's models have no biases
        raise RecipeError(f"torchtitan {TORCHTITAN_VERSION} has no model with norm={mc.norm}, mlp={mc.mlp}, "
                          f"position_embedding={mc.position_embedding}, bias={mc.bias}; use a RMSNorm/SwiGLU/RoPE "
                          "preset, or train it with train.py or Megatron")
    return family.titan


def titan_flavor(mc: ModelConfig, tc: TrainConfig) -> dict:
    """Arguments of the torchtitan model-args dataclass that give exactly our model."""
    if titan_family(mc) == "qwen3":
        return {"dim": mc.n_embd, "n_layers": mc.n_layer, "n_heads": mc.n_head, "n_kv_heads": mc.n_kv_head,
                "head_dim": mc.head_dim, "hidden_dim": mc.intermediate_size, "vocab_size": mc.vocab_size,
                "norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "qk_norm": True,
                "enable_weight_tying": mc.tie_embeddings, "max_seq_len": tc.block_size}
    if mc.tie_embeddings or mc.head_dim * mc.n_head != mc.n_embd:
        raise RecipeError("torchtitan's llama3 needs untied embeddings and head_dim = n_embd / n_head; "
                          "this preset has neither")
    mult, multiple_of = llama_ffn(mc.n_embd, mc.intermediate_size)
    rope = {"scaling_factor": 1.0}  # torchtitan applies Llama-3.1 scaling (factor 8) unless told otherwise
    if mc.rope_scaling_factor is not None:
        rope = {"scaling_factor": mc.rope_scaling_factor, "low_freq_factor": mc.rope_low_freq_factor,
                "high_freq_factor": mc.rope_high_freq_factor,
                "original_max_position_embeddings": mc.rope_original_max_seq_len}
    return {"dim": mc.n_embd, "n_layers": mc.n_layer, "n_heads": mc.n_head, "n_kv_heads": mc.n_kv_head,
            "vocab_size": mc.vocab_size, "ffn_dim_multiplier": mult, "multiple_of": multiple_of,
            "norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "rope_scaling": rope,
            "max_seq_len": tc.block_size}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def to_toml(doc: dict[str, dict]) -> str:
    """Sections of scalars (a dotted section name is a nested table)."""
    out = []
    for section, values in doc.items():
        out.append(f"[{section}]")
        out += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def prepared_dataset(path: str, mc: ModelConfig) -> dict:
    """meta.json of a prepared dataset whose ids fit the preset's vocabulary, or RecipeError."""
    try:
        meta = read_meta(resolve_data_dir(path))
    except DataError as e:
        raise RecipeError(f"dataset {path} is not prepared: {e}") from None
    problem = vocab_mismatch(meta, mc.vocab_size)
    if problem is not None:
        raise RecipeError(f"dataset {path}: {problem}; prepare it with the preset's tokenizer")
    return meta


def parallelism_text(rep: int, shard: int, tp: int, pp: int, cp: int) -> str:
    parts = []
    if shard > 1 and rep > 1:
        parts.append(f"HSDP: {rep} replicas, each sharding parameters, gradients and optimizer state over {shard} GPUs")
    elif shard > 1:
        parts.append(f"FSDP: parameters, gradients and optimizer state sharded over {shard} GPUs")
    elif rep > 1:
        parts.append(f"DDP: the model replicated on {rep} GPUs")
    parts += [f"{name} degree {n}" for name, n in (("tensor parallel", tp), ("pipeline parallel", pp),
                                                     ("context parallel", cp)) if n > 1]
    return "; ".join(parts) or "a single GPU, no parallelism"


def torchtitan(preset: str, ngpu: int, out: str, dp_shard: int = -1, dp_replicate: int = 1, tp: int = 1,
               pp: int = 1, cp: int = 1, float8: str | None = None, init_from_hf: str | None = None,
               dataset: str | None = None, steps: int | None = None) -> list[str]:
    """Write llama3-style TOML, flavor module, run_train.sh and README for the preset; returns the paths."""
    tc, mc = load_preset(preset)
    family = titan_family(mc)
    rep, shard = data_parallel(ngpu, tp, pp, cp, dp_replicate, dp_shard)
    check_heads(mc, tp)
    if pp > 1 and family == "qwen3":
        raise RecipeError(f"torchtitan {TORCHTITAN_VERSION} has no pipeline parallelism for qwen3 (qk_norm) models; "
                          "use --pp 1 with FSDP/TP, or Megatron")
    if float8 is not None:
        if float8 not in ("tensorwise", "rowwise"):
            raise RecipeError(f"--float8={float8} is not a recipe; use tensorwise or rowwise")
        check_fp8(mc)
    if init_from_hf is not None and not os.path.isfile(os.path.join(init_from_hf, "config.json")):
        raise RecipeError(f"--init_from_hf {init_from_hf} has no config.json; make it with: python export_hf.py ...")
    # An explicit --dataset must be prepared now; the preset's own dataset may be prepared later
    # (DRY_RUN=1 checks it before any GPU time is spent).
    data_dir = resolve_data_dir(dataset or tc.dataset)
    if dataset is not None:
        prepared_dataset(data_dir, mc)
    micro, glob = check_batch(tc, rep * shard)
    steps = steps or tc.max_iters
    flavor = titan_flavor(mc, tc)
    name = os.path.splitext(os.path.basename(preset))[0]
    dump = f"./outputs/{name}"
    lr_decay = tc.lr_decay_iters or tc.max_iters
    doc = {
        "job": {"dump_folder": dump, "description": f"nanollm preset {name}", "print_config": True},
        "profiling": {"enable_profiling": False, "save_traces_folder": "profile_trace", "profile_freq": 100},
        "metrics": {"log_freq": tc.log_interval, "enable_tensorboard": True, "save_tb_folder": "tb"},
        "model": {"name": f"nanollm_{family}", "flavor": name,
                  "converters": ["quantize.linear.float8"] if float8 else []},
        "optimizer": {"name": "AdamW", "lr": tc.learning_rate, "eps": 1e-8, "beta1": tc.beta1, "beta2": tc.beta2,
                      "weight_decay": tc.weight_decay},
        "lr_scheduler": {"warmup_steps": tc.warmup_iters, "decay_ratio": round(1 - tc.warmup_iters / steps, 6)
                         if lr_decay >= steps else round((lr_decay - tc.warmup_iters) / steps, 6),
                         "decay_type": "cosine" if tc.decay_lr else "linear",
                         "min_lr_factor": tc.min_lr / tc.learning_rate if tc.decay_lr else 1.0},
        "training": {"local_batch_size": micro, "global_batch_size": glob, "seq_len": tc.block_size,
                     "max_norm": tc.grad_clip, "steps": steps, "dataset": "nanollm_shards",
                     "dataset_path": os.path.abspath(data_dir), "mixed_precision_param": "bfloat16"},
        "parallelism": {"data_parallel_replicate_degree": rep, "data_parallel_shard_degree": shard,
                        "tensor_parallel_degree": tp, "pipeline_parallel_degree": pp, "context_parallel_degree": cp,
                        "fsdp_reshard_after_forward": "default"},
        "checkpoint": {"enable": True, "folder": "checkpoint", "interval": tc.eval_interval,
                       "last_save_model_only": True, "last_save_in_hf": True, "export_dtype": "bfloat16"},
        "activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"},
        "compile": {"enable": tc.compile, "components": ["model", "loss"]},
        "experimental": {"custom_import": FLAVOR_MODULE},
        "debug": {"seed": tc.seed},  # also the seed of our shard stream's order
    }
    if init_from_hf is not None:
        doc["checkpoint"] |= {"initial_load_path": os.path.abspath(init_from_hf), "initial_load_in_hf": True,
                              "initial_load_model_only": True}
    if float8:
        doc["quantize.linear.float8"] = {"recipe_name": float8, "filter_fqns": ["output"]}
    os.makedirs(out, exist_ok=True)
    toml_path = os.path.join(out, f"{name}.toml")
    atomic.write_file(toml_path, f"# torchtitan {TORCHTITAN_VERSION} recipe generated by nanollm from {preset}\n"
                 + to_toml(doc))
    with open(os.path.join(HERE, "titan_spec.py")) as f:
        spec_src = f.read()
    flavor_src = (f'"""torchtitan {TORCHTITAN_VERSION} flavor and shard dataloader for {name}, generated by nanollm."""\n\n'
                  f"FAMILY = {family!r}\nFLAVOR = {name!r}\nFLAVOR_ARGS = {flavor!r}\nNANOLLM_ROOT = {ROOT!r}\n"
                  "\n" + spec_src.split("# --- generated above ---\n", 1)[1])
    atomic.write_file(os.path.join(out, f"{FLAVOR_MODULE}.py"), flavor_src)
    atomic.write_file(os.path.join(out, "run_train.sh"), run_train_sh(os.path.basename(toml_path), ngpu), 0o755)
    readme = titan_readme(name, preset, toml_path, ngpu, rep, shard, tp, pp, cp, tc, mc, doc, float8)
    atomic.write_file(os.path.join(out, "README.md"), readme)
    return [toml_path, os.path.join(out, f"{FLAVOR_MODULE}.py"), os.path.join(out, "run_train.sh"),
            os.path.join(out, "README.md")]


def run_train_sh(toml_name: str, ngpu: int) -> str:
    return f"""#!/usr/bin/env bash
# Launch torchtitan {TORCHTITAN_VERSION} on this recipe (generated by nanollm).
#   NGPU=N CONFIG_FILE=... LOG_RANK=0,1 ./run_train.sh
#   DRY_RUN=1 ./run_train.sh     checks the recipe with nanollm's validator (no GPU)
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
NGPU=${{NGPU:-{ngpu}}}
LOG_RANK=${{LOG_RANK:-0}}
CONFIG_FILE=${{CONFIG_FILE:-"$HERE/{toml_name}"}}
COMM_BACKEND=${{COMM_BACKEND:-nccl}}
if [[ "$COMM_BACKEND" != "nccl" ]]; then
  echo "error: COMM_BACKEND=$COMM_BACKEND is not supported; torchtitan {TORCHTITAN_VERSION} uses nccl (unset it)" >&2
  exit 2
fi
if [[ "${{DRY_RUN:-0}}" == "1" ]]; then
  # torchtitan {TORCHTITAN_VERSION} has no CPU dry run (its fake backend still calls torch.cuda.set_device).
  cd {shlex.quote(ROOT)}  # the nanollm checkout that generated this recipe
  exec "${{NANOLLM_PYTHON:-python}}" -m recipes validate --require_data "$HERE"
fi
export PYTHONPATH="$HERE${{PYTHONPATH:+:$PYTHONPATH}}"  # for [experimental] custom_import
export PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True"
torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint="localhost:0" \\
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \\
  -m torchtitan.train --job.config_file "$CONFIG_FILE" "$@"
"""


def titan_readme(name: str, preset: str, toml_path: str, ngpu: int, rep: int, shard: int, tp: int, pp: int,
                 cp: int, tc: TrainConfig, mc: ModelConfig, doc: dict, float8: str | None) -> str:
    ck = doc["checkpoint"]
    init = (f"starts from the Hugging Face folder `{ck['initial_load_path']}`" if "initial_load_path" in ck
            else "starts from random weights")
    return f"""# {name} on torchtitan {TORCHTITAN_VERSION}

Generated by `python -m recipes torchtitan {preset} --ngpu {ngpu} ...` from nanollm's preset: the
shapes, vocabulary, batch and schedule are the preset's. Regenerate rather than edit.

## Parallelism

- Data Parallel Replicate Degree: {rep}
- Data Parallel Shard Degree: {shard}
- Tensor Parallel Degree: {tp}
- Pipeline Parallel Degree: {pp}
- Context Parallel Degree: {cp}

Total GPU count: {ngpu}. Effective strategy: {parallelism_text(rep, shard, tp, pp, cp)}.

## Model and data

- Model: `{doc['model']['name']}` flavor `{name}` ({mc.n_layer} layers, {mc.n_embd} wide, {mc.n_head} heads,
  {mc.n_kv_head} KV heads, FFN {mc.intermediate_size}, vocab {mc.vocab_size}), registered by `{FLAVOR_MODULE}.py`
  through `[experimental] custom_import`.
- Data: nanollm token shards at `{doc['training']['dataset_path']}`, read directly (no tokenizer).
- Sequence length {tc.block_size}, local batch {doc['training']['local_batch_size']}, global batch
  {doc['training']['global_batch_size']} sequences, {doc['training']['steps']} steps.
- AdamW, LR {tc.learning_rate}, {tc.warmup_iters} warmup steps then {doc['lr_scheduler']['decay_type']} decay to
  {tc.min_lr}; gradient clipping {tc.grad_clip}; bfloat16 parameters under FSDP.

## Features

- Activation checkpointing: {doc['activation_checkpoint']['mode']} ({doc['activation_checkpoint']['selective_ac_option']})
- Compile: {"enabled for " + ", ".join(doc['compile']['components']) if doc['compile']['enable'] else "disabled"}
- Float8: {float8 + " (torchao, sm_89+ GPUs; rarely pays below a few billion parameters)" if float8 else "off"}
- Profiling: disabled (`[profiling] enable_profiling = true` saves traces to `profile_trace/`)
- TensorBoard: enabled (`tb/`)
- Checkpointing: every {ck['interval']} steps to `checkpoint/`; {init}; the last save is Hugging Face
  safetensors (`last_save_in_hf`), which `python train.py ... --init_from=<that folder>` loads back.

## Run

```bash
pip install torch torchtitan=={TORCHTITAN_VERSION} triton safetensors
DRY_RUN=1 ./run_train.sh           # nanollm's validator (torchtitan {TORCHTITAN_VERSION} has no CPU dry run)
NGPU={ngpu} ./run_train.sh
```

`NGPU`, `CONFIG_FILE` (default `{os.path.basename(toml_path)}`), `LOG_RANK` (e.g. `0,1`) and `DRY_RUN` are
honoured; `COMM_BACKEND` must be `nccl` (nvshmem was never in a torchtitan release). Outputs go to
`{doc['job']['dump_folder']}` (`tb/`, `checkpoint/`, `profile_trace/`); view curves with
`tensorboard --logdir {doc['job']['dump_folder']}/tb`.

The degrees satisfy DP_REPLICATE x DP_SHARD x TP x PP x CP = {ngpu} GPUs.
"""


def megatron(preset: str, ngpu: int, out: str, tp: int = 1, pp: int = 1, cp: int = 1, fp8: str | None = None,
             data: str | None = None, mock: bool = False) -> list[str]:
    """Write a Megatron-LM train script laid out like train_llama3_8b_h100_fp8.sh, and its README."""
    tc, mc = load_preset(preset)
    _, dp = data_parallel(ngpu, tp, pp, cp)
    check_heads(mc, tp)
    if fp8 is not None:
        if fp8 not in ("hybrid", "e4m3"):
            raise RecipeError(f"--fp8={fp8} is not a Megatron FP8 format; use hybrid or e4m3")
        check_fp8(mc)
    if mc.n_layer % pp:
        raise RecipeError(f"n_layer={mc.n_layer} is not divisible by --pp={pp}; choose a pipeline degree that divides it")
    unmapped = [name for name, on in (("norm=rmsnorm_1p", mc.norm == "rmsnorm_1p"), ("mlp=geglu", mc.mlp == "geglu"),
                                      ("scale_embeddings", mc.scale_embeddings)) if on]
    if unmapped:
        raise RecipeError(f"this Megatron recipe maps no {', '.join(unmapped)} to Megatron-LM arguments; "
                          "train this preset with train.py")
    if data is None and not mock:
        raise RecipeError("give --data data/<name> (a prepared dataset) or --mock")
    data_args = ""
    if data is not None:
        data_dir = resolve_data_dir(data)
        prepared_dataset(data_dir, mc)
        prefixes = megatron_data.convert(data_dir)
        data_args = " ".join(megatron_data.data_path_args(prefixes))
    micro, glob = check_batch(tc, dp)
    divisor = vocab_divisor(mc.vocab_size, tp)
    name = os.path.splitext(os.path.basename(preset))[0]
    model = [f"--num-layers {mc.n_layer}", f"--hidden-size {mc.n_embd}", f"--ffn-hidden-size {mc.intermediate_size}",
             f"--num-attention-heads {mc.n_head}", f"--kv-channels {mc.head_dim}",
             f"--seq-length {tc.block_size}", f"--max-position-embeddings {max(tc.block_size, mc.block_size)}",
             f"--init-method-std {mc.init_std}", "--attention-dropout 0.0", "--hidden-dropout 0.0",
             f"--norm-epsilon {mc.norm_eps}"]
    if mc.n_kv_head != mc.n_head:
        model += ["--group-query-attention", f"--num-query-groups {mc.n_kv_head}"]
    model.append("--normalization RMSNorm" if mc.norm == "rmsnorm" else "--normalization LayerNorm")
    model.append("--swiglu" if mc.mlp == "swiglu" else "")
    if mc.position_embedding == "rope":
        model += ["--position-embedding-type rope", f"--rotary-base {int(mc.rope_theta)}", "--rotary-percent 1.0"]
        if mc.rope_scaling_factor is not None:
            if (mc.rope_low_freq_factor, mc.rope_high_freq_factor, mc.rope_original_max_seq_len) != (1.0, 4.0, 8192):
                raise RecipeError("Megatron's --use-rope-scaling has fixed Llama-3.1 factors (low 1, high 4, 8192); "
                                  "this preset uses others")
            model += ["--use-rope-scaling", f"--rope-scaling-factor {mc.rope_scaling_factor}"]
    else:
        model.append("--position-embedding-type learned_absolute")
    if mc.qk_norm:
        model.append("--qk-layernorm")
    if not mc.bias:
        model.append("--disable-bias-linear")
    if not mc.tie_embeddings:
        model.append("--untie-embeddings-and-output-weights")
    model = [m for m in model if m]
    lr_decay = tc.lr_decay_iters or tc.max_iters
    training = [f"--micro-batch-size {micro}", f"--global-batch-size {glob}", f"--train-iters {tc.max_iters}",
                f"--lr {tc.learning_rate}", f"--min-lr {tc.min_lr}", f"--lr-warmup-iters {tc.warmup_iters}",
                f"--lr-decay-iters {lr_decay}", f"--lr-decay-style {'cosine' if tc.decay_lr else 'constant'}",
                f"--clip-grad {tc.grad_clip}", f"--weight-decay {tc.weight_decay}", f"--adam-beta1 {tc.beta1}",
                f"--adam-beta2 {tc.beta2}", f"--seed {tc.seed}", "--bf16", "--use-mcore-models",
                "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    parallel = [f"--tensor-model-parallel-size {tp}", f"--pipeline-model-parallel-size {pp}",
                f"--context-parallel-size {cp}"] + (["--sequence-parallel"] if tp > 1 else [])
    fp8_args = ([f"--fp8-format {fp8}", "--fp8-amax-history-len 1024", "--fp8-amax-compute-algo max",
                 "--fp8-param-gather"] if fp8 else [])
    vocab = [f"--vocab-size {mc.vocab_size - 1}", f"--make-vocab-size-divisible-by {divisor}"]

    def arr(name: str, items: list[str]) -> str:
        return f"{name}=(\n" + "".join(f"    {i}\n" for i in items) + ")\n"

    script = f"""#!/bin/bash
# Megatron-LM {MEGATRON_TAG} recipe for nanollm preset {name} (generated from {preset}; regenerate, don't edit).
# Run from the root of a Megatron-LM checkout at tag {MEGATRON_TAG}:
#   bash train_{name}.sh CHECKPOINT_PATH TENSORBOARD_LOGS_PATH [TOKENIZER_ARG] [DATA_ARG]
# TOKENIZER_ARG is ignored: our shards are already token ids, read with NullTokenizer.
# DATA_ARG: MOCK (default) or NANOLLM for the generated data paths, or your own --data-path prefix.
set -euo pipefail
{"export CUDA_DEVICE_MAX_CONNECTIONS=1  # TP/CP overlap needs ordered kernel launches" if tp > 1 or cp > 1 else "# CUDA_DEVICE_MAX_CONNECTIONS=1 is needed only with TP or CP"}

CHECKPOINT_PATH=${{1:-"checkpoints/{name}"}}
TENSORBOARD_LOGS_PATH=${{2:-"tensorboard_logs/{name}"}}
TOKENIZER_ARG=${{3:-"NULL"}}
DATA_ARG=${{4:-"{"NANOLLM" if data else "MOCK"}"}}
GPUS_PER_NODE={ngpu}
NUM_NODES=${{NUM_NODES:-1}}
MASTER_ADDR=${{MASTER_ADDR:-localhost}}
MASTER_PORT=${{MASTER_PORT:-6000}}
NODE_RANK=${{NODE_RANK:-0}}
PRETRAIN_SCRIPT_PATH="pretrain_gpt.py"
DATA_CACHE_PATH="${{PWD}}/benchmark_cache_{name}"

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

{arr("MODEL_ARGS", model)}
{arr("TRAINING_ARGS", training)}
{arr("DTYPE_ARGS", fp8_args)}
{arr("MODEL_PARALLEL_ARGS", parallel)}
# NullTokenizer adds one EOD id to --vocab-size, giving exactly the preset's {mc.vocab_size}; the divisor keeps
# Megatron from padding it (vocab % (divisor x TP) == 0).
{arr("TOKENIZER_ARGS", ["--tokenizer-type NullTokenizer"] + vocab)}
if [[ "$DATA_ARG" == "MOCK" ]]; then
    DATA_ARGS_LIST=(--mock-data --split 99,1,0)
elif [[ "$DATA_ARG" == "NANOLLM" ]]; then
    {f"DATA_ARGS_LIST=({data_args})" if data_args else 'echo "error: this recipe was generated with --mock, so it has no nanollm data paths; regenerate it with --data data/<name>, or pass MOCK or a --data-path prefix" >&2; exit 2'}
else
    DATA_ARGS_LIST=(--data-path "$DATA_ARG" --split 99,1,0)
fi
DATA_ARGS_LIST+=(--data-cache-path "$DATA_CACHE_PATH" --no-create-attention-mask-in-dataloader --num-workers 1)

EVAL_AND_LOGGING_ARGS=(
    --log-interval {tc.log_interval}
    --eval-iters {tc.eval_iters}
    --eval-interval {tc.eval_interval}
    --save-interval {tc.eval_interval}
    --log-throughput
    --ckpt-format torch_dist
    --distributed-timeout-minutes 60
    --save "$CHECKPOINT_PATH"
    --load "$CHECKPOINT_PATH"
    --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)

if [[ "${{PRINT_ARGS:-0}}" == "1" ]]; then
    # One argument per line: what the nanollm check feeds to Megatron's own parse_args.
    printf '%s\\n' "${{MODEL_ARGS[@]}}" "${{TRAINING_ARGS[@]}}" "${{DTYPE_ARGS[@]}}" "${{MODEL_PARALLEL_ARGS[@]}}" \\
        "${{TOKENIZER_ARGS[@]}}" "${{DATA_ARGS_LIST[@]}}" "${{EVAL_AND_LOGGING_ARGS[@]}}"
    exit 0
fi
if [[ ! -f "$PRETRAIN_SCRIPT_PATH" ]]; then
    echo "error: $PRETRAIN_SCRIPT_PATH not found; run this script from the root of a Megatron-LM {MEGATRON_TAG} checkout" >&2
    exit 2
fi
mkdir -p "$(dirname "$CHECKPOINT_PATH")" "$(dirname "$TENSORBOARD_LOGS_PATH")" "$DATA_CACHE_PATH"
torchrun "${{DISTRIBUTED_ARGS[@]}}" "$PRETRAIN_SCRIPT_PATH" \\
    "${{MODEL_ARGS[@]}}" "${{TRAINING_ARGS[@]}}" "${{DTYPE_ARGS[@]}}" "${{MODEL_PARALLEL_ARGS[@]}}" \\
    "${{TOKENIZER_ARGS[@]}}" "${{DATA_ARGS_LIST[@]}}" "${{EVAL_AND_LOGGING_ARGS[@]}}"
"""
    os.makedirs(out, exist_ok=True)
    script_path = os.path.join(out, f"train_{name}.sh")
    atomic.write_file(script_path, script, 0o755)
    readme = f"""# {name} on Megatron-LM {MEGATRON_TAG}

Generated by `python -m recipes megatron {preset} --ngpu {ngpu} ...` from nanollm's preset.

- Model: {mc.n_layer} layers, hidden {mc.n_embd}, FFN {mc.intermediate_size}, {mc.n_head} heads, {mc.n_kv_head} query
  groups, head dim {mc.head_dim}, {"RMSNorm" if mc.norm == "rmsnorm" else "LayerNorm"} (eps {mc.norm_eps}),
  {"rotary base " + str(int(mc.rope_theta)) if mc.position_embedding == "rope" else "learned positions"}
  {"with Llama-3.1 scaling" if mc.rope_scaling_factor else ""}, vocab {mc.vocab_size} (NullTokenizer
  `--vocab-size {mc.vocab_size - 1}` + EOD, `--make-vocab-size-divisible-by {divisor}`: no padding).
- Parallelism: TP {tp}, PP {pp}, CP {cp}, data parallel {dp} = {ngpu} GPUs.
- Batch: micro {micro}, global {glob} sequences of {tc.block_size} tokens; {tc.max_iters} iterations.
- LR {tc.learning_rate}, {tc.warmup_iters} warmup iterations, cosine to {tc.min_lr} at {lr_decay}.
- FP8: {fp8 + " (Transformer Engine, sm_89+ GPU; FP8 rarely pays below a few billion parameters)" if fp8 else "off"}.
- Data: {"our shards " + (data or "") + " as Megatron indexed datasets (`.idx` written beside each shard)" if data else "mock data"}.

Run from a Megatron-LM checkout at `{MEGATRON_TAG}`:

```bash
cd /path/to/Megatron-LM && git checkout {MEGATRON_TAG}
bash {os.path.abspath(script_path)} /workspace/checkpoints /workspace/tensorboard_logs NULL {"NANOLLM" if data else "MOCK"}
```

Weights move to and from Hugging Face safetensors through Megatron-Bridge (needs Transformer Engine, GPU
machines); optimizer state never moves between engines.
"""
    atomic.write_file(os.path.join(out, "README.md"), readme)
    return [script_path, os.path.join(out, "README.md")]


def validate(out: str, require_data: bool = False) -> list[str]:
    """Checks a generated recipe folder can pass on this machine; returns what was checked.

    require_data: also the torchtitan recipe's dataset must be prepared (what DRY_RUN=1 asks)."""
    done = []
    if not os.path.isdir(out):
        raise RecipeError(f"recipe folder {out} does not exist; generate it first")
    files = sorted(os.listdir(out))
    for f in files:
        path = os.path.join(out, f)
        text = open(path).read()
        left = [] if f.endswith(".py") else PLACEHOLDER.findall(text)  # Python f-strings use {NAME} too
        if left:
            raise RecipeError(f"{path} still has placeholders {sorted(set(left))}; regenerate it")
        if f.endswith(".toml"):
            try:
                doc = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise RecipeError(f"{path} is not valid TOML ({e}); regenerate it") from None
            check_toml(doc, path)
            if require_data:
                try:
                    read_meta(doc["training"]["dataset_path"])
                except DataError as e:
                    raise RecipeError(f"{path}: the dataset is not prepared: {e}") from None
                done.append(f"{f}: dataset {doc['training']['dataset_path']} is prepared")
            done.append(f"{f}: TOML parses, degrees multiply, batch divides")
        if f.endswith(".sh"):
            r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
            if r.returncode:
                raise RecipeError(f"{path} is not valid bash: {r.stderr.strip().splitlines()[0]}")
            done.append(f"{f}: bash -n passes")
            if f.startswith("train_"):
                check_megatron_args(path)
                done.append(f"{f}: vocab and degrees consistent")
        if f.endswith(".py"):
            compile(text, path, "exec")
            done.append(f"{f}: compiles")
    return done


TOML_TYPES = {("training", "steps"): int, ("training", "local_batch_size"): int,
              ("training", "global_batch_size"): int, ("training", "seq_len"): int, ("optimizer", "lr"): float,
              ("lr_scheduler", "warmup_steps"): int, ("parallelism", "data_parallel_shard_degree"): int}


def check_toml(doc: dict, path: str) -> None:
    """Types torchtitan only warns about, and the degree/batch arithmetic."""
    for (sec, key), want in TOML_TYPES.items():
        v = doc.get(sec, {}).get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, want if want is int else int | float):
            raise RecipeError(f"{path}: [{sec}] {key} = {v!r} is not {want.__name__}; regenerate the recipe")
    p = doc["parallelism"]
    degrees = [p[k] for k in ("data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
                              "pipeline_parallel_degree", "context_parallel_degree")]
    dp = degrees[0] * degrees[1]
    t = doc["training"]
    if t["global_batch_size"] % (t["local_batch_size"] * dp):
        raise RecipeError(f"{path}: global_batch_size {t['global_batch_size']} is not divisible by local batch x DP")


def megatron_arg_list(script: str) -> list[str]:
    """The Megatron arguments the generated script passes (PRINT_ARGS=1), one token each."""
    script = os.path.abspath(script)  # run from its own folder, as a user would: a relative path would not resolve
    r = subprocess.run(["bash", script, "ck", "tb", "NULL", "MOCK"], capture_output=True, text=True,
                       env={**os.environ, "PRINT_ARGS": "1"}, cwd=os.path.dirname(script))
    if r.returncode:
        raise RecipeError(f"{script} failed to print its arguments: {r.stderr.strip()}")
    return [tok for line in r.stdout.splitlines() for tok in shlex.split(line)]


def check_megatron_args(script: str) -> None:
    args = megatron_arg_list(script)
    get = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    V = int(get["--vocab-size"]) + 1
    divisor = int(get["--make-vocab-size-divisible-by"])
    tp = int(get["--tensor-model-parallel-size"])
    if V % (divisor * tp):
        raise RecipeError(f"{script}: vocab {V} is not a multiple of divisor {divisor} x TP {tp}; Megatron would pad it")


PARALLEL_NAMES = {"tp": "tensor-parallel", "pp": "pipeline-parallel", "cp": "context-parallel"}


def main(argv: list[str] | None = None) -> int:
    p = errors.ArgumentParser(prog="python -m recipes", description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("torchtitan", help="torchtitan TOML, flavor module, run_train.sh, README")
    t.add_argument("config", help="a train.py config file (config/...)")
    t.add_argument("--ngpu", type=int, required=True, help="GPUs of the run (the product of the parallel degrees)")
    t.add_argument("--dp_shard", type=int, default=-1, help="FSDP degree; -1: what the other degrees leave")
    t.add_argument("--dp_replicate", type=int, default=1, help="replicated (HSDP) degree")
    for k in ("tp", "pp", "cp"):
        t.add_argument(f"--{k}", type=int, default=1, help=f"{PARALLEL_NAMES[k]} degree")
    t.add_argument("--float8", choices=["tensorwise", "rowwise"], help="float8 linears (off when unset)")
    t.add_argument("--init_from_hf", help="a Hugging Face folder to start from (torchtitan's checkpoint.initial_load_path)")
    t.add_argument("--dataset", help="a prepared data/<name> folder (our shards)")
    t.add_argument("--steps", type=int, help="training steps (default: the config's max_iters)")
    t.add_argument("--out", required=True, help="the recipe folder to write")
    m = sub.add_parser("megatron", help="Megatron-LM train script and README")
    m.add_argument("config", help="a train.py config file (config/...)")
    m.add_argument("--ngpu", type=int, required=True, help="GPUs of the run")
    for k in ("tp", "pp", "cp"):
        m.add_argument(f"--{k}", type=int, default=1, help=f"{PARALLEL_NAMES[k]} degree")
    m.add_argument("--fp8", choices=["hybrid", "e4m3"], help="Megatron's --fp8-format (off when unset)")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--data", help="a prepared data/<name> folder (megatron-data writes its .idx files)")
    g.add_argument("--mock", action="store_true", help="Megatron's mock data (no folder)")
    m.add_argument("--out", required=True, help="the recipe folder to write")
    md = sub.add_parser("megatron-data", help="write .idx files beside a prepared dataset's shards")
    md.add_argument("data", help="a prepared data/<name> folder")
    v = sub.add_parser("validate", help="check a generated recipe folder")
    v.add_argument("dir", help="a folder written by torchtitan or megatron")
    v.add_argument("--require_data", action="store_true", help="the torchtitan recipe's dataset must be prepared")
    return errors.run_command(lambda: run(p.parse_args(argv)))


def run(a: argparse.Namespace) -> int:
    if a.cmd == "torchtitan":
        paths = torchtitan(a.config, a.ngpu, a.out, a.dp_shard, a.dp_replicate, a.tp, a.pp, a.cp, a.float8,
                           a.init_from_hf, a.dataset, a.steps)
    elif a.cmd == "megatron":
        paths = megatron(a.config, a.ngpu, a.out, a.tp, a.pp, a.cp, a.fp8, a.data, a.mock)
    elif a.cmd == "megatron-data":
        try:
            prefixes = megatron_data.convert(a.data)
        except DataError as e:
            raise RecipeError(f"dataset {a.data} is not prepared: {e}") from None
        paths = megatron_data.data_path_args(prefixes)
    else:
        paths = validate(a.dir, a.require_data)
    print("\n".join(paths))
    return 0
