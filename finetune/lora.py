"""
LoRA as a transform of our GPT: per-projection adapters on the fused linears, merge, PEFT export/import.

Each adapted linear computes, for each output slice i (q, k, v of c_attn; gate, up of c_fc):
    y_i = W_i x + b_i + scaling * B_i (A_i dropout_i(x))        A_i: (r, in), B_i: (out_i, r)
exactly as peft does on the unfused HF modules (LlamaForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM), so adapters,
PiSSA's per-slice SVD and the files on disk all match peft's. One matmul runs the frozen fused base;
the adapters then add one (in -> n*r) matmul of the stacked A's and one (n*r -> out) matmul of a
block-diagonal B, fused into the base output with addmm. Nothing (out, in)-sized is built per step.

- Targets use HF names (families.LORA_TARGETS): q_proj, k_proj, v_proj (slices of attn.c_attn), o_proj
  (attn.c_proj), gate_proj, up_proj (slices of mlp.c_fc; a GELU MLP's c_fc is up_proj), down_proj
  (mlp.c_proj). The PEFT keys they are saved under come from the family's layout (families.py).
- scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
- init: "default" (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), "pissa" (fp32 SVD
  of each slice, sqrt(S / scaling) into both factors, base slice replaced by the residual), and
  "pissa_niter_N" (torch.svd_lowrank with niter=N, run under a forked RNG seeded per slice).
- Base weights are frozen (they may be bf16); adapters are fp32 masters cast to the activation dtype
  inside forward. Cast the base (model.to(dtype)) BEFORE apply_lora, or the adapters are cast too.
- FLOPs: a frozen weight costs 4 FLOPs per parameter per token in training (forward 2, gradient
  with respect to the input 2; no weight gradient), not the 6 of a trained one. The adapters add
  6 * r * (in + out) per adapted projection, negligible at small r.

peft is the test oracle only; this module never imports it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import atomic
import families
import hf_checkpoint
from errors import UserError
from families import LORA_TARGETS
from model import GPT


class AdapterError(UserError):
    """A PEFT adapter folder that cannot be read or does not fit the base; one line naming the file."""


_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclass
class LoRAConfig:
    """Rank, scaling, dropout, targets (HF names) and init of the adapters."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0  # on the adapter input, independently per projection (as peft)
    target_modules: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    init: str = "default"  # default | gaussian | pissa | pissa_niter_N

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora r={self.r!r} must be a positive integer")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a <= 0:
            raise ValueError(f"lora alpha={a!r} must be a positive finite number")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ValueError(f"lora dropout={p!r} must be in [0, 1)")
        if isinstance(self.target_modules, str) or not isinstance(self.target_modules, list | tuple):
            raise ValueError(
                f"lora target_modules={self.target_modules!r} must be a list of {', '.join(LORA_TARGETS)}"
            )
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(
                f"lora target_modules={list(self.target_modules)!r} must be distinct names among {', '.join(LORA_TARGETS)}"
            )
        self.target_modules = tuple(t for t in LORA_TARGETS if t in self.target_modules)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"lora use_rslora={self.use_rslora!r} must be true or false")
        if not isinstance(self.init, str) or (
            self.init not in ("default", "gaussian", "pissa") and not _NITER.fullmatch(self.init)
        ):
            raise ValueError(
                f"lora init={self.init!r} must be default, gaussian, pissa or pissa_niter_N (N >= 0)"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def is_pissa(self) -> bool:
        return self.init.startswith("pissa")


class LoRALinear(nn.Linear):
    """A frozen (fused) nn.Linear plus one adapter per targeted output slice.

    The base weight and bias keep their names (weight, bias), so the model's state dict, hf_checkpoint.to_hf and
    FLOP counting see the same base; adapters are lora_A.<hf_name> (r, in) and lora_B.<hf_name> (out_i, r).
    """

    def __init__(
        self, base: nn.Linear, slices: list[tuple[str, int]], targets: tuple[str, ...], cfg: LoRAConfig
    ):
        nn.Module.__init__(self)
        assert sum(n for _, n in slices) == base.out_features
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = slices  # [(hf_name, rows)] covering every output row, targeted or not
        self.r, self.scaling, self.dropout = cfg.r, cfg.scaling, cfg.dropout
        dev = base.weight.device
        # insertion order is the slice order (ParameterDict would sort a plain dict's keys)
        self.names = [name for name, _ in slices if name in targets]
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, rows in slices:
            if name in targets:
                self.lora_A[name] = nn.Parameter(torch.zeros(cfg.r, self.in_features, device=dev))
                self.lora_B[name] = nn.Parameter(torch.zeros(rows, cfg.r, device=dev))
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A0, B0), fp32

    def row_range(self, name: str) -> slice:
        start = 0
        for n, rows in self.slices:
            if n == name:
                return slice(start, start + rows)
            start += rows
        raise KeyError(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out): the frozen fused base, one matmul
        dt = y.dtype
        names = self.names
        if self.dropout > 0 and self.training:
            # independent dropout per projection, as peft's separate modules draw
            h = torch.cat(
                [F.linear(F.dropout(x, self.dropout, True), self.lora_A[n].to(dt)) for n in names], -1
            )
        else:
            a = self.lora_A[names[0]] if len(names) == 1 else torch.cat([self.lora_A[n] for n in names])
            h = F.linear(x, a.to(dt))  # (..., n*r)
        if len(self.slices) == 1:
            b = self.lora_B[names[0]]
        else:
            # block-diagonal (out, n*r); untargeted slices get zero rows
            blocks = [self.lora_B[n] if n in self.lora_B else h.new_zeros(rows, 0) for n, rows in self.slices]
            b = torch.block_diag(*[blk.float() for blk in blocks])
        y2 = torch.addmm(
            y.reshape(-1, self.out_features), h.reshape(-1, h.size(-1)), b.to(dt).t(), alpha=self.scaling
        )
        return y2.view(y.shape)


def _adapted_linears(model: GPT) -> list[tuple[str, nn.Module, str, list[tuple[str, int]]]]:
    """(prefix, parent, attribute, slices) for every linear that can carry adapters, in HF module order."""
    c = model.config
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    mlp_in = (
        [("gate_proj", c.intermediate_size), ("up_proj", c.intermediate_size)]
        if c.gated_mlp
        else [("up_proj", c.intermediate_size)]
    )
    out = []
    for i, block in enumerate(model.h):
        out.append(
            (
                f"h.{i}.attn.",
                block.attn,
                "c_attn",
                [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)],
            )
        )
        out.append((f"h.{i}.attn.", block.attn, "c_proj", [("o_proj", c.n_embd)]))
        out.append((f"h.{i}.mlp.", block.mlp, "c_fc", mlp_in))
        out.append((f"h.{i}.mlp.", block.mlp, "c_proj", [("down_proj", c.n_embd)]))
    return out


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every adapted linear (LoRALinear), in HF module order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "init_factors")]


def _pissa_factors(w: torch.Tensor, r: int, scaling: float, niter: int | None, seed: int):
    """peft's pissa_init on one (out, in) slice: returns A (r, in), B (out, r) and the fp32 residual."""
    weight = w.to(torch.float32)
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
        Vr = V[:, :r]
        Sr = S[:r]
        Sr /= scaling
        Uhr = Uh[:r]
    else:
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            Vr, Sr, Ur = torch.svd_lowrank(weight.data, r, niter=niter)
        Sr /= scaling
        Uhr = Ur.t()
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    residual = weight.data - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual


@torch.no_grad()
def apply_lora(
    model: GPT, cfg: LoRAConfig, *, seed: int = 0, init_state: dict[str, torch.Tensor] | None = None
) -> GPT:
    """Freeze every base parameter and add the adapters in place; returns model.

    With init_state (from lora_init_state), the initial factors are taken from it and a PiSSA residual
    is rebuilt from the original base bit for bit, without another SVD.
    pissa_niter_N: slice k (in HF module order, from 0) runs svd_lowrank under torch.manual_seed(seed + k).
    """
    if not isinstance(cfg, LoRAConfig):
        raise ValueError(f"apply_lora needs a LoRAConfig, got {type(cfg).__name__}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it or build a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    m = _NITER.fullmatch(cfg.init)
    niter = int(m.group(1)) if m else None
    gen = torch.Generator().manual_seed(seed)
    k = 0
    for _prefix, parent, attr, slices in _adapted_linears(model):
        if not any(n in cfg.target_modules for n, _ in slices):
            continue
        mod = LoRALinear(getattr(parent, attr), slices, cfg.target_modules, cfg)
        setattr(parent, attr, mod)
        for name in mod.lora_A:
            A, B = mod.lora_A[name], mod.lora_B[name]
            if init_state is not None:
                continue
            if cfg.is_pissa:
                rows = mod.row_range(name)
                a, b, residual = _pissa_factors(mod.weight[rows], cfg.r, cfg.scaling, niter, seed + k)
                A.copy_(a)
                B.copy_(b)
                mod.weight[rows] = residual.to(mod.weight.dtype)
            elif cfg.init == "gaussian":
                A.copy_(torch.randn(A.shape, generator=gen) / cfg.r)
            else:
                a = torch.empty(A.shape)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                A.copy_(a)
            mod.init_factors[name] = (A.detach().clone(), B.detach().clone())
            k += 1
    model.lora_config = cfg
    if init_state is not None:
        restore_base_from_init(model, init_state)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, in a fixed order."""
    return [p for _, m in lora_modules(model) for factors in (m.lora_A, m.lora_B) for p in factors.values()]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, under our names (e.g. h.0.attn.c_attn.lora_A.q_proj)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights saved by lora_state_dict; keys and shapes must match exactly."""
    own = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ValueError(
            f"LoRA state dict does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"LoRA tensor {k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}"
            )
        own[k].copy_(v)


def lora_init_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The initial factors (fp32), under lora_state_dict's names; with them a resume rebuilds the base."""
    out = {}
    for mname, m in lora_modules(model):
        for n, (a0, b0) in m.init_factors.items():
            out[f"{mname}.lora_A.{n}"], out[f"{mname}.lora_B.{n}"] = a0, b0
    return out


@torch.no_grad()
def restore_base_from_init(model: nn.Module, init_state: dict[str, torch.Tensor]) -> None:
    """Set the adapters to their initial factors and, for PiSSA, the base slices to W - scaling * B0 A0.

    The model must hold the ORIGINAL base weights; the expression is pissa_init's, so the residual is
    bitwise the one the SVD run produced.
    """
    cfg = model.lora_config
    load_lora_state_dict(model, init_state)
    for _, m in lora_modules(model):
        for n in m.lora_A:
            a0, b0 = m.lora_A[n].detach().clone(), m.lora_B[n].detach().clone()
            m.init_factors[n] = (a0, b0)
            if cfg.is_pissa:
                rows = m.row_range(n)
                weight = m.weight[rows].to(torch.float32)
                m.weight[rows] = (weight.data - m.scaling * b0 @ a0).to(m.weight.dtype)


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base slice in fp32 (W_i + scaling * B_i A_i) and return a plain GPT."""
    for _prefix, parent, attr, _slices in _adapted_linears(model):
        m = getattr(parent, attr)
        if not hasattr(m, "init_factors"):
            continue
        w = m.weight.detach().to(torch.float32).clone()
        for n in m.lora_A:
            w[m.row_range(n)] += m.scaling * (m.lora_B[n].float() @ m.lora_A[n].float())
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(m.weight.dtype))
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach())
        setattr(parent, attr, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# -- PEFT format ------------------------------------------------------------------------------

def _peft_keys(model: GPT) -> dict[tuple[str, str], str]:
    """(our module name, hf name) -> peft key prefix, e.g. base_model.model.model.layers.0.self_attn.q_proj."""
    family = families.family_for(model.config)
    layout = family.layout
    out = {}
    for mname, m in lora_modules(model):
        i = mname.split(".")[1]
        for n, _ in m.slices:
            module = layout.peft_module(n)
            if module is None:
                raise ValueError(
                    f"PEFT export/import needs a separate module for {n}; {family.title} checkpoints fuse them "
                    f"({family.architecture}), so merge_lora and hf_checkpoint.to_hf instead"
                )
            out[(mname, n)] = f"base_model.model.{layout.block.format(i=i)}{module}"
    return out


def save_peft_adapter(
    model: GPT,
    cfg: LoRAConfig,
    out_dir: str,
    base_model: str,
    *,
    convert_pissa_to_original_base: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors (HF module names) atomically into out_dir.

    state: the adapter tensors under lora_state_dict's names, for a model whose own are sharded (FSDP
    gathers them collectively first); None reads them from the model.

    convert_pissa_to_original_base: for a PiSSA model, write peft's rank-2r conversion
    (A' = [A; A0], B' = [B | -B0], r' = 2r, alpha scaled to keep the scaling), which applies to the
    original base weights; it is what peft's save_pretrained(path_initial_model_for_weight_conversion=...)
    writes. For other inits the adapter already applies to the original base and is written as is.
    """
    from safetensors.torch import save_file

    keys = _peft_keys(model)
    convert = convert_pissa_to_original_base and cfg.is_pissa
    tensors = {}
    for mname, m in lora_modules(model):
        for n in m.lora_A:
            if state is None:
                a, b = m.lora_A[n].detach().float().cpu(), m.lora_B[n].detach().float().cpu()
            else:
                a, b = state[f"{mname}.lora_A.{n}"].float().cpu(), state[f"{mname}.lora_B.{n}"].float().cpu()
            if convert:
                a0, b0 = (t.float().cpu() for t in m.init_factors[n])
                a, b = torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)
            tensors[keys[(mname, n)] + ".lora_A.weight"] = a.contiguous()
            tensors[keys[(mname, n)] + ".lora_B.weight"] = b.contiguous()
    r, alpha = cfg.r, cfg.alpha
    if convert:
        r, alpha = 2 * r, alpha * (2**0.5 if cfg.use_rslora else 2)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "use_rslora": cfg.use_rslora,
        # True: peft must not re-run an SVD on load; the weights below are complete
        "init_lora_weights": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with atomic.temp_dir(out_dir, prefix=".tmp-adapter-") as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic.replace_dir(tmp, out_dir)


def load_adapted(base_model: str, adapter_path: str | None) -> GPT:
    """The base (a Hugging Face folder) in fp32 with a PEFT-format adapter applied, or the base alone."""
    model = hf_checkpoint.from_hf(base_model, dtype=torch.float32)
    if adapter_path is not None:
        load_peft_adapter(model, adapter_path)
    return model.eval()


def load_peft_adapter(model: GPT, adapter_dir: str) -> LoRAConfig:
    """Apply a peft-format LoRA adapter (as peft saves it for a Llama/Qwen3 base) to model; returns its config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    w_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(
                f"{p} not found: an adapter folder holds adapter_config.json and adapter_model.safetensors"
            )
    try:
        with open(cfg_path) as f:
            pc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(pc, dict) or pc.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type must be LORA")
    for key, ok in (
        ("rank_pattern", lambda v: not v),
        ("alpha_pattern", lambda v: not v),
        ("use_dora", lambda v: not v),
        ("bias", lambda v: v in (None, "none")),
        ("fan_in_fan_out", lambda v: not v),
        ("layers_to_transform", lambda v: v is None),
        ("modules_to_save", lambda v: not v),
        ("target_modules", lambda v: isinstance(v, list)),
    ):
        if key in pc and not ok(pc[key]):
            raise AdapterError(
                f"{cfg_path}: {key}={pc[key]!r} is not supported (plain LoRA on HF projection names only)"
            )
    init = pc.get("init_lora_weights", True)
    try:
        cfg = LoRAConfig(
            r=pc.get("r", 8),
            alpha=pc.get("lora_alpha", 8),
            dropout=pc.get("lora_dropout", 0.0),
            target_modules=tuple(pc.get("target_modules") or ()),
            use_rslora=bool(pc.get("use_rslora", False)),
            init=init if init in ("gaussian",) else "default",
        )
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: {e}") from None
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{w_path} is not a readable safetensors file ({e})") from None
    try:
        apply_lora(model, cfg)
    except ValueError as e:  # targets this base does not have, a rank larger than a projection
        raise AdapterError(f"{cfg_path} does not fit this base: {e}") from None
    keys = _peft_keys(model)
    own = {}
    for mname, m in lora_modules(model):
        for n in m.lora_A:
            own[keys[(mname, n)] + ".lora_A.weight"] = m.lora_A[n]
            own[keys[(mname, n)] + ".lora_B.weight"] = m.lora_B[n]
    # peft may insert the adapter name (".lora_A.default.weight"); drop it
    tensors = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in tensors.items()}
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise AdapterError(f"{w_path} does not match the model: missing {missing[:2]}, unexpected {extra[:2]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise AdapterError(
                    f"{w_path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}"
                )
            own[k].copy_(v)
        for _, m in lora_modules(model):
            m.init_factors = {
                n: (m.lora_A[n].detach().clone(), m.lora_B[n].detach().clone()) for n in m.lora_A
            }
    return cfg
