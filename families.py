"""
One spec per model family: everything that varies by family, in one place. SYSTEM_OVERVIEW.md has the
checklist for adding one.

model.py switches on features (norm, mlp, positions, qk_norm, scale_embeddings, ...), never on a family's
name. A family is data: the feature values its transformers class computes, and how that class stores them.

| family | transformers class | our presets        | features                                                    |
|--------|--------------------|--------------------|-------------------------------------------------------------|
| gpt2   | GPT2LMHeadModel    | gpt2               | learned positions, LayerNorm with bias, GELU MLP             |
| llama  | LlamaForCausalLM   | llama2, llama3     | RoPE (Llama-3.1 scaling optional), RMSNorm, SwiGLU, GQA      |
| qwen3  | Qwen3ForCausalLM   | qwen3              | the LLaMA blocks plus QK-norm and a free head_dim            |
| gemma  | GemmaForCausalLM   | gemma              | RMSNorm (1 + w), GeGLU (tanh GELU), sqrt(n_embd) x embeddings |

LLaMA-2 and LLaMA-3 are one family here: one transformers class, one state-dict layout, one torchtitan
model; they differ only in preset values (rope_theta, GQA, scaling, vocabulary, tokenizer).

Each Family holds:
- requires: the feature values its class computes; exporting a ModelConfig picks the family whose values
  all match (family_for), so a model trained from a preset finds its class without a name;
- read_config / write_config: config.json to ModelConfig fields and back;
- layout: where each of our tensors lives in the class's state dict (hf_checkpoint.py converts with it,
  finetune/lora.py names PEFT adapter keys with it);
- titan: torchtitan's model for it (recipes/generate.py), or None when torchtitan has none.

LoRA's target names (LORA_TARGETS) are our projections' HF names, the same for every family.
This module imports no torch: finetune/config.py checks target names with it before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from errors import UserError

if TYPE_CHECKING:
    from model import ModelConfig


class HFCheckpointError(UserError):
    """A Hugging Face folder we cannot read or a model we cannot express as one."""


# LoRA's targets: the HF projection names of the slices of our fused linears (finetune/lora.py), in HF
# module order: q, k, v of attn.c_attn; o of attn.c_proj; gate, up of mlp.c_fc (a GELU MLP's c_fc is
# up_proj alone); down of mlp.c_proj.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """Where our tensors live in a transformers state dict: module names, ours -> theirs (.weight/.bias kept).

    A fused linear of ours lists its HF modules in the order of its output rows (c_attn: q, k, v; c_fc: gate, up).
    """

    top: dict[str, str]  # wte, wpe, ln_f, lm_head
    block: str  # prefix of layer i, with {i}
    norms: dict[str, str]  # in a block
    linears: dict[str, tuple[str, ...]]  # in a block
    conv1d: bool = False  # linear weights stored (in, out), as GPT-2's Conv1D
    optional_prefix: str = ""  # some hub files leave it off every key (GPT-2's 'transformer.')

    def hf_keys(self, key: str) -> tuple[tuple[str, ...], bool]:
        """The HF keys that hold our state-dict key (several for a fused linear), and whether it is transposed."""
        module, param = key.rsplit(".", 1)
        if not module.startswith("h."):
            return (f"{self.top[module]}.{param}",), False
        _, i, module = module.split(".", 2)
        prefix = self.block.format(i=i)
        if module in self.norms:
            return (f"{prefix}{self.norms[module]}.{param}",), False
        names = tuple(f"{prefix}{n}.{param}" for n in self.linears[module])
        return names, self.conv1d and param == "weight"

    def peft_module(self, target: str) -> str | None:
        """The HF module (in a block) of a LoRA target, e.g. self_attn.q_proj; None when the class fuses it."""
        return next((n for names in self.linears.values() for n in names if n.rsplit(".", 1)[-1] == target), None)


GPT2_LAYOUT = Layout(
    top={"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head"},
    block="transformer.h.{i}.",
    norms={"ln_1": "ln_1", "ln_2": "ln_2"},
    linears={n: (n,) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
    conv1d=True,
    optional_prefix="transformer.",
)

LLAMA_LAYOUT = Layout(  # also Qwen3's and Gemma's
    top={"wte": "model.embed_tokens", "ln_f": "model.norm", "lm_head": "lm_head"},
    block="model.layers.{i}.",
    norms={
        "ln_1": "input_layernorm",
        "ln_2": "post_attention_layernorm",
        "attn.q_norm": "self_attn.q_norm",
        "attn.k_norm": "self_attn.k_norm",
    },
    linears={
        "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "attn.c_proj": ("self_attn.o_proj",),
        "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.c_proj": ("mlp.down_proj",),
    },
)


def _no_refusal(c: ModelConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Family:
    """What varies by model family: its transformers class, config mapping, state-dict layout, recipes."""

    name: str  # config.json's model_type
    title: str  # for messages
    architecture: str  # the transformers class
    presets: tuple[str, ...]  # our presets of it: config/tiny_<preset>.py, tokenizer names
    requires: dict[str, tuple]  # ModelConfig feature -> the values the class computes
    read_config: Callable[[dict], dict]  # config.json -> ModelConfig fields
    write_config: Callable[[ModelConfig], dict]  # ModelConfig -> config.json (without architectures, dtype)
    layout: Layout
    refuse: Callable[[ModelConfig], str | None] = field(default=_no_refusal)  # why the class cannot hold c
    titan: str | None = None  # torchtitan's model (recipes/generate.py); None: no torchtitan recipe

    def matches(self, c: ModelConfig) -> bool:
        return all(getattr(c, k) in v for k, v in self.requires.items())


# -----------------------------------------------------------------------------
# config.json, both ways


def _rope_params(hf: dict) -> dict:
    """RoPE settings from either the transformers v5 'rope_parameters' or the v4 'rope_theta'/'rope_scaling'."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


# GPT-2's activation_function -> our mlp, and the name each of ours is exported under
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}
GPT2_EXPORT_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu"}


def _gpt2_read(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise HFCheckpointError(f"GPT-2 activation {act!r} is not supported (only {', '.join(GPT2_ACTIVATIONS)})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise HFCheckpointError("GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    return dict(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=GPT2_ACTIVATIONS[act],
        position_embedding="learned",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gpt2_write(c: ModelConfig) -> dict:
    return dict(
        model_type="gpt2",
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.intermediate_size,
        activation_function=GPT2_EXPORT_ACTIVATION[c.mlp],
        layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=c.tie_embeddings,
    )


def _gpt2_refuse(c: ModelConfig) -> str | None:
    if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd:
        return "GPT2LMHeadModel has no grouped-query attention or separate head_dim"
    return None


def _decoder_read(hf: dict, **features) -> dict:
    """The fields every LLaMA-style config.json shares (Llama, Qwen3, Gemma), plus the family's features."""
    rope = _rope_params(hf)
    kw = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        position_embedding="rope",
        rope_theta=float(rope["rope_theta"]),
        bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    ) | features
    if rope["rope_type"] == "llama3":
        kw.update(
            rope_scaling_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    elif rope["rope_type"] != "default":
        raise HFCheckpointError(f"rope_type={rope['rope_type']!r} is not supported (default and llama3 are)")
    return kw


def _decoder_write(c: ModelConfig, model_type: str, hidden_act: str) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor is not None:
        rope = {
            "rope_type": "llama3",
            "rope_theta": c.rope_theta,
            "factor": c.rope_scaling_factor,
            "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_seq_len,
        }
    return dict(
        model_type=model_type,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.block_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        hidden_act=hidden_act,
        rms_norm_eps=c.norm_eps,
        attention_bias=c.bias,
        attention_dropout=0.0,
        tie_word_embeddings=c.tie_embeddings,
        rope_parameters=rope,
        # transformers v4 reads these two keys instead of rope_parameters
        rope_theta=c.rope_theta,
        rope_scaling=None if c.rope_scaling_factor is None else {k: v for k, v in rope.items() if k != "rope_theta"},
    )


def _check_silu(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
    if hf.get("use_sliding_window"):
        raise HFCheckpointError("sliding-window attention is not supported")


def _llama_read(hf: dict) -> dict:
    _check_silu(hf)
    kw = _decoder_read(hf)
    if bool(hf.get("mlp_bias", False)) != kw["bias"]:
        raise HFCheckpointError("attention_bias and mlp_bias must agree (our 'bias' field covers both)")
    return kw


def _llama_write(c: ModelConfig) -> dict:
    return _decoder_write(c, "llama", "silu") | {"mlp_bias": c.bias}


def _qwen3_read(hf: dict) -> dict:
    _check_silu(hf)
    kw = _decoder_read(hf, qk_norm=True)
    if kw["bias"]:
        raise HFCheckpointError("Qwen3 with attention_bias=True is not supported (its MLP has no biases)")
    return kw


def _qwen3_write(c: ModelConfig) -> dict:
    return _decoder_write(c, "qwen3", "silu") | dict(
        use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer
    )


def _qwen3_refuse(c: ModelConfig) -> str | None:
    if c.bias:
        return "Qwen3ForCausalLM has no MLP biases; export with bias=False"
    if c.rope_scaling_factor is not None:
        return "this exporter writes Llama-3.1 rope scaling only for LlamaForCausalLM"
    return None


# Gemma's activation names for the tanh GELU; transformers reads a legacy "gelu" as the tanh one too
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu")


def _gemma_read(hf: dict) -> dict:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA_ACTIVATIONS:
        raise HFCheckpointError(f"Gemma activation {act!r} is not supported (only the tanh GELU: gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise HFCheckpointError("Gemma with use_bidirectional_attention is not supported (ours is causal)")
    kw = _decoder_read(hf, norm="rmsnorm_1p", mlp="geglu", scale_embeddings=True)
    kw["tie_embeddings"] = hf.get("tie_word_embeddings", True)
    if kw["bias"]:
        raise HFCheckpointError("Gemma with attention_bias=True is not supported (its MLP has no biases)")
    return kw


def _gemma_write(c: ModelConfig) -> dict:
    return _decoder_write(c, "gemma", "gelu_pytorch_tanh")


def _gemma_refuse(c: ModelConfig) -> str | None:
    if c.bias:
        return "GemmaForCausalLM has no MLP biases; export with bias=False"
    if c.rope_scaling_factor is not None:
        return "this exporter writes Llama-3.1 rope scaling only for LlamaForCausalLM"
    return None


# -----------------------------------------------------------------------------
# The families

_LLAMA_BLOCKS = dict(position_embedding=("rope",), norm=("rmsnorm",), mlp=("swiglu",), scale_embeddings=(False,))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="gpt2",
            title="GPT-2",
            architecture="GPT2LMHeadModel",
            presets=("gpt2",),
            requires=dict(position_embedding=("learned",), norm=("layernorm",), mlp=("gelu", "gelu_exact"),
                          bias=(True,), qk_norm=(False,), scale_embeddings=(False,)),
            read_config=_gpt2_read,
            write_config=_gpt2_write,
            layout=GPT2_LAYOUT,
            refuse=_gpt2_refuse,
        ),
        Family(
            name="llama",
            title="LLaMA",
            architecture="LlamaForCausalLM",
            presets=("llama2", "llama3"),
            requires=dict(_LLAMA_BLOCKS, qk_norm=(False,)),
            read_config=_llama_read,
            write_config=_llama_write,
            layout=LLAMA_LAYOUT,
            titan="llama3",
        ),
        Family(
            name="qwen3",
            title="Qwen3",
            architecture="Qwen3ForCausalLM",
            presets=("qwen3",),
            requires=dict(_LLAMA_BLOCKS, qk_norm=(True,)),
            read_config=_qwen3_read,
            write_config=_qwen3_write,
            layout=LLAMA_LAYOUT,
            refuse=_qwen3_refuse,
            titan="qwen3",
        ),
        Family(
            name="gemma",
            title="Gemma",
            architecture="GemmaForCausalLM",
            presets=("gemma",),
            requires=dict(position_embedding=("rope",), norm=("rmsnorm_1p",), mlp=("geglu",),
                          qk_norm=(False,), scale_embeddings=(True,)),
            read_config=_gemma_read,
            write_config=_gemma_write,
            layout=LLAMA_LAYOUT,
            refuse=_gemma_refuse,
        ),
    )
}


def from_model_type(model_type: object) -> Family:
    """The family of a config.json's model_type, or HFCheckpointError naming the supported ones."""
    if model_type not in FAMILIES:
        expected = ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())
        raise HFCheckpointError(f"model_type={model_type!r} is not supported; expected one of {expected}")
    return FAMILIES[model_type]


def family_for(c: ModelConfig) -> Family:
    """The family whose transformers class computes the same function as c, or HFCheckpointError."""
    for f in FAMILIES.values():
        if f.matches(c):
            problem = f.refuse(c)
            if problem:
                raise HFCheckpointError(problem)
            return f
    needs = "; ".join(
        f"{f.title} needs " + ", ".join(f"{k}={'|'.join(map(str, v))}" for k, v in f.requires.items())
        for f in FAMILIES.values()
    )
    raise HFCheckpointError(
        "this configuration mixes features that no supported transformers class has "
        f"(position_embedding={c.position_embedding}, norm={c.norm}, mlp={c.mlp}, bias={c.bias}, "
        f"qk_norm={c.qk_norm}, scale_embeddings={c.scale_embeddings}); {needs}"
    )
