"""
Hugging Face checkpoints in and out: GPT2LMHeadModel, LlamaForCausalLM and Qwen3ForCausalLM.

from_hf(path) reads config.json and the safetensors weights of a local folder into our GPT.
to_hf(model, path) writes the reverse: a folder that transformers.AutoModelForCausalLM.from_pretrained
loads without trust_remote_code. Conversion is not a method of the model, so model.py never imports
this module.

Name and layout differences handled here:
- GPT-2 stores linear weights transposed (Conv1D, (in, out)); we use nn.Linear's (out, in).
- LLaMA/Qwen3 keep q, k, v and gate, up as separate matrices; ours are fused (c_attn, c_fc).
- The RoPE layout is the same (rotate-half), so no permutation of q/k rows is needed.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import atomic
from errors import UserError
from model import GPT, ModelConfig

SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained: shards of at most 5 GB


class HFCheckpointError(UserError):
    """A Hugging Face folder we cannot read or a model we cannot express as one."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFCheckpointError(
            f"{cfg_path} not found; pass a local Hugging Face model folder (config.json + *.safetensors)"
        )
    with open(cfg_path) as f:
        return json.load(f)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HFCheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {path}; "
            "only safetensors checkpoints are read (convert .bin files with transformers first)"
        )
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(os.path.join(path, name)))
    return weights


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


def hf_to_config(hf: dict, overrides: dict | None = None) -> ModelConfig:
    """ModelConfig for a transformers config.json dict."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise HFCheckpointError(
                f"GPT-2 activation {act!r} is not supported (only {', '.join(GPT2_ACTIVATIONS)})"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise HFCheckpointError(
                "GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
            )
        kw = dict(
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
    elif model_type in ("llama", "qwen3"):
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise HFCheckpointError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
        if hf.get("use_sliding_window"):
            raise HFCheckpointError("sliding-window attention is not supported")
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
            qk_norm=model_type == "qwen3",
            bias=bool(hf.get("attention_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
        if model_type == "qwen3" and kw["bias"]:
            raise HFCheckpointError("Qwen3 with attention_bias=True is not supported (its MLP has no biases)")
        if model_type == "llama" and bool(hf.get("mlp_bias", False)) != kw["bias"]:
            raise HFCheckpointError("attention_bias and mlp_bias must agree (our 'bias' field covers both)")
        if rope["rope_type"] == "llama3":
            kw.update(
                rope_scaling_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
            )
        elif rope["rope_type"] != "default":
            raise HFCheckpointError(
                f"rope_type={rope['rope_type']!r} is not supported (default and llama3 are)"
            )
    else:
        raise HFCheckpointError(
            f"model_type={model_type!r} is not supported; expected gpt2 (GPT2LMHeadModel), "
            "llama (LlamaForCausalLM) or qwen3 (Qwen3ForCausalLM)"
        )
    kw.update(overrides or {})
    return ModelConfig(**kw)


def from_hf(path: str, dtype: torch.dtype | None = None, **overrides) -> GPT:
    """Load a local Hugging Face folder (config.json + safetensors) of GPT2LMHeadModel, LlamaForCausalLM
    or Qwen3ForCausalLM. overrides replace ModelConfig fields (e.g. attention_backend)."""
    hf = read_config(path)
    config = hf_to_config(hf, overrides)
    w = _read_weights(path)
    sd = _gpt2_to_ours(w, config) if hf["model_type"] == "gpt2" else _llama_to_ours(w, config)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(sd, strict=True, assign=True)  # no random init of 8B weights
    if dtype is not None:
        model.to(dtype)
    return model


def _take(w: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in w:
        raise HFCheckpointError(f"checkpoint has no tensor {key!r}; is it a complete, supported model?")
    return w.pop(key)


def _gpt2_to_ours(w: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    # Hub GPT-2 files exist with and without the 'transformer.' prefix.
    w = {k.removeprefix("transformer."): v for k, v in w.items()}
    sd = {"wte.weight": _take(w, "wte.weight"), "wpe.weight": _take(w, "wpe.weight")}
    for i in range(c.n_layer):
        p = f"h.{i}."
        for name in ("ln_1", "ln_2"):
            sd[p + name + ".weight"] = _take(w, p + name + ".weight")
            sd[p + name + ".bias"] = _take(w, p + name + ".bias")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            sd[p + name + ".weight"] = _take(w, p + name + ".weight").t().contiguous()  # Conv1D (in, out)
            sd[p + name + ".bias"] = _take(w, p + name + ".bias")
    sd["ln_f.weight"], sd["ln_f.bias"] = _take(w, "ln_f.weight"), _take(w, "ln_f.bias")
    if not c.tie_embeddings:
        sd["lm_head.weight"] = _take(w, "lm_head.weight")
    return sd


def _llama_to_ours(w: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {"wte.weight": _take(w, "model.embed_tokens.weight"), "ln_f.weight": _take(w, "model.norm.weight")}
    for i in range(c.n_layer):
        hp, p = f"model.layers.{i}.", f"h.{i}."
        sd[p + "ln_1.weight"] = _take(w, hp + "input_layernorm.weight")
        sd[p + "ln_2.weight"] = _take(w, hp + "post_attention_layernorm.weight")
        qkv = [_take(w, hp + f"self_attn.{n}_proj.weight") for n in "qkv"]
        sd[p + "attn.c_attn.weight"] = torch.cat(qkv, dim=0)
        sd[p + "attn.c_proj.weight"] = _take(w, hp + "self_attn.o_proj.weight")
        gate_up = [_take(w, hp + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        sd[p + "mlp.c_fc.weight"] = torch.cat(gate_up, dim=0)
        sd[p + "mlp.c_proj.weight"] = _take(w, hp + "mlp.down_proj.weight")
        if c.bias:
            sd[p + "attn.c_attn.bias"] = torch.cat([_take(w, hp + f"self_attn.{n}_proj.bias") for n in "qkv"])
            sd[p + "attn.c_proj.bias"] = _take(w, hp + "self_attn.o_proj.bias")
            sd[p + "mlp.c_fc.bias"] = torch.cat([_take(w, hp + f"mlp.{n}_proj.bias") for n in ("gate", "up")])
            sd[p + "mlp.c_proj.bias"] = _take(w, hp + "mlp.down_proj.bias")
        if c.qk_norm:
            sd[p + "attn.q_norm.weight"] = _take(w, hp + "self_attn.q_norm.weight")
            sd[p + "attn.k_norm.weight"] = _take(w, hp + "self_attn.k_norm.weight")
    if not c.tie_embeddings:
        sd["lm_head.weight"] = _take(w, "lm_head.weight")
    return sd


# -----------------------------------------------------------------------------
# Export


def hf_architecture(c: ModelConfig) -> str:
    """The transformers class that computes the same function as this config, or a ValueError."""
    gpt2 = dict(position_embedding="learned", norm="layernorm", qk_norm=False, bias=True)
    llama = dict(position_embedding="rope", norm="rmsnorm", mlp="swiglu")
    if c.mlp in GPT2_EXPORT_ACTIVATION and all(getattr(c, k) == v for k, v in gpt2.items()):
        if c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.n_embd:
            raise HFCheckpointError("GPT2LMHeadModel has no grouped-query attention or separate head_dim")
        return "GPT2LMHeadModel"
    if all(getattr(c, k) == v for k, v in llama.items()):
        if c.qk_norm:
            if c.bias:
                raise HFCheckpointError("Qwen3ForCausalLM has no MLP biases; export with bias=False")
            if c.rope_scaling_factor is not None:
                raise HFCheckpointError(
                    "this exporter writes Llama-3.1 rope scaling only for LlamaForCausalLM"
                )
            return "Qwen3ForCausalLM"
        return "LlamaForCausalLM"
    raise HFCheckpointError(
        "this configuration mixes features that no supported transformers class has "
        f"(position_embedding={c.position_embedding}, norm={c.norm}, mlp={c.mlp}, bias={c.bias}); "
        "GPT-2 needs learned/layernorm/gelu/bias, LLaMA and Qwen3 need rope/rmsnorm/swiglu"
    )


def config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    arch = hf_architecture(c)
    dtype_name = str(dtype).removeprefix("torch.")
    if arch == "GPT2LMHeadModel":
        return dict(
            architectures=[arch],
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
            dtype=dtype_name,
        )
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
    hf = dict(
        architectures=[arch],
        model_type="qwen3" if arch == "Qwen3ForCausalLM" else "llama",
        vocab_size=c.vocab_size,
        max_position_embeddings=c.block_size,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        hidden_act="silu",
        rms_norm_eps=c.norm_eps,
        attention_bias=c.bias,
        attention_dropout=0.0,
        tie_word_embeddings=c.tie_embeddings,
        rope_parameters=rope,
        # transformers v4 reads these two keys instead of rope_parameters
        rope_theta=c.rope_theta,
        rope_scaling=None
        if c.rope_scaling_factor is None
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        dtype=dtype_name,
    )
    if arch == "LlamaForCausalLM":
        hf["mlp_bias"] = c.bias
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    return hf


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """model.py's state dict renamed and reshaped to the transformers layout."""
    c = model.config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if hf_architecture(c) == "GPT2LMHeadModel":
        for k, v in sd.items():
            if k.endswith(".weight") and any(n in k for n in ("c_attn", "c_proj", "c_fc")):
                v = v.t()  # back to Conv1D (in, out)
            out[k if k == "lm_head.weight" else "transformer." + k] = v
        return out
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out["model.embed_tokens.weight"] = sd["wte.weight"]
    out["model.norm.weight"] = sd["ln_f.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        hp, p = f"model.layers.{i}.", f"h.{i}."
        out[hp + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[hp + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
        suffixes = ("weight", "bias") if c.bias else ("weight",)
        for s in suffixes:
            q, k, v = sd[f"{p}attn.c_attn.{s}"].split([q_dim, kv_dim, kv_dim], dim=0)
            out[f"{hp}self_attn.q_proj.{s}"], out[f"{hp}self_attn.k_proj.{s}"] = q, k
            out[f"{hp}self_attn.v_proj.{s}"] = v
            out[f"{hp}self_attn.o_proj.{s}"] = sd[f"{p}attn.c_proj.{s}"]
            gate, up = sd[f"{p}mlp.c_fc.{s}"].chunk(2, dim=0)
            out[f"{hp}mlp.gate_proj.{s}"], out[f"{hp}mlp.up_proj.{s}"] = gate, up
            out[f"{hp}mlp.down_proj.{s}"] = sd[f"{p}mlp.c_proj.{s}"]
        if c.qk_norm:
            out[hp + "self_attn.q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[hp + "self_attn.k_norm.weight"] = sd[p + "attn.k_norm.weight"]
    return out


def to_hf(model: GPT, path: str, dtype: torch.dtype | None = None) -> None:
    """Write a folder that transformers.AutoModelForCausalLM.from_pretrained(path) loads as is:
    config.json and model.safetensors (sharded above 5 GB), atomically."""
    dtype = dtype or next(model.parameters()).dtype
    hf_config = config_to_hf(model.config, dtype)
    tensors = {
        k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state_dict_to_hf(model).items()
    }

    with atomic.temp_dir(path, prefix=".tmp-hf-") as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        atomic.replace_dir(tmp, path)
