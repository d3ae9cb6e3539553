"""
Hugging Face checkpoints in and out, for every family in families.py (GPT2LMHeadModel, LlamaForCausalLM,
Qwen3ForCausalLM, GemmaForCausalLM).

from_hf(path) reads config.json and the safetensors weights of a local folder into our GPT.
to_hf(model, path) writes the reverse: a folder that transformers.AutoModelForCausalLM.from_pretrained
loads without trust_remote_code. Conversion is not a method of the model, so model.py never imports
this module.

What differs by family (config.json keys, tensor names) is data in families.py; this module does the I/O
and the tensor work that every family shares:
- a fused linear of ours (c_attn = q, k, v; SwiGLU/GeGLU c_fc = gate, up) is the row-wise concatenation of
  the HF modules its layout lists, split back on export;
- GPT-2 stores linear weights transposed (Conv1D, (in, out)); we use nn.Linear's (out, in);
- the RoPE layout is the same (rotate-half), so no permutation of q/k rows is needed;
- Gemma's (1 + w) RMSNorm keeps w as is: our norm="rmsnorm_1p" computes the same (1 + w).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import atomic
import families
from families import HFCheckpointError
from model import GPT, ModelConfig

SHARD_BYTES = 5 * 1024**3  # as transformers' save_pretrained: shards of at most 5 GB


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



def hf_to_config(hf: dict, overrides: dict | None = None) -> ModelConfig:
    """ModelConfig for a transformers config.json dict."""
    kw = families.from_model_type(hf.get("model_type")).read_config(hf)
    kw.update(overrides or {})
    return ModelConfig(**kw)


def from_hf(path: str, dtype: torch.dtype | None = None, **overrides) -> GPT:
    """Load a local Hugging Face folder (config.json + safetensors) of any family in families.py.
    overrides replace ModelConfig fields (e.g. attention_backend)."""
    hf = read_config(path)
    config = hf_to_config(hf, overrides)
    layout = families.from_model_type(hf["model_type"]).layout
    w = _read_weights(path)
    with torch.device("meta"):
        model = GPT(config)
    sd = {}
    for key in model.state_dict():
        names, transposed = layout.hf_keys(key)
        parts = [_take(w, name, layout.optional_prefix) for name in names]
        v = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]  # (out, in): the fused rows in order
        sd[key] = v.t().contiguous() if transposed else v  # Conv1D stores (in, out)
    model.load_state_dict(sd, strict=True, assign=True)  # no random init of 8B weights
    if dtype is not None:
        model.to(dtype)
    return model


def _take(w: dict[str, torch.Tensor], key: str, optional_prefix: str = "") -> torch.Tensor:
    if key not in w and optional_prefix and key.startswith(optional_prefix):
        key = key.removeprefix(optional_prefix)  # hub GPT-2 files exist with and without 'transformer.'
    if key not in w:
        raise HFCheckpointError(f"checkpoint has no tensor {key!r}; is it a complete, supported model?")
    return w.pop(key)


# -----------------------------------------------------------------------------
# Export


def hf_architecture(c: ModelConfig) -> str:
    """The transformers class that computes the same function as this config, or HFCheckpointError."""
    return families.family_for(c).architecture


def config_to_hf(c: ModelConfig, dtype: torch.dtype) -> dict:
    family = families.family_for(c)
    return {"architectures": [family.architecture]} | family.write_config(c) | {
        "dtype": str(dtype).removeprefix("torch.")
    }


def _row_split(c: ModelConfig, key: str, n: int) -> list[int]:
    """Rows of each of the n HF modules in our fused linear `key`: c_attn is q, k, v; c_fc is gate, up."""
    if ".c_attn." in key:
        return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
    return [c.intermediate_size] * n


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """model.py's state dict renamed and reshaped to the transformers layout of its family."""
    c = model.config
    layout = families.family_for(c).layout
    sd = model.state_dict()
    with torch.device("meta"):
        keys = list(GPT(c).state_dict())  # the plain model's keys: no LoRA factors
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        names, transposed = layout.hf_keys(key)
        v = sd[key].t() if transposed else sd[key]  # back to Conv1D (in, out)
        parts = v.split(_row_split(c, key, len(names)), dim=0) if len(names) > 1 else [v]
        out.update(zip(names, parts, strict=True))
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
