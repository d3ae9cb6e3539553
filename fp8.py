"""
FP8 training: a transform of the raw model (torchao's float8 linears), applied after the model is
built and before parallel.wrap compiles and shards it.

    model = build_model(...)
    plan, hooks = fp8.convert(model, "tensorwise", emulate=False)   # swaps nn.Linear -> Float8Linear
    train_model = parallel.wrap(model, ...)
    loop.Loop(..., after_step=hooks)     # what the conversion needs after each optimizer step

Each block linear's matmuls run in float8 (e4m3 inputs and weights, e5m2 or e4m3 gradients) with
dynamic scales: one per tensor ("tensorwise") or one per row ("rowwise"). Master weights, the
optimizer and the state dict are unchanged (a converted model saves and exports the same keys).
What stays in high precision, and why:
- the output head: forward() never calls lm_head.forward (the fused loss reads its weight), and
  a tied head is the embedding table;
- any linear with a dimension not divisible by 16 (float8 tensor cores need it);
- small GEMMs, by torchao's per-recipe size thresholds measured on H100 (casting costs more than
  the faster matmul saves); `emulate=True` (CPU tests) keeps them, since it measures numerics,
  not speed.

MFU of an FP8 run is reported against the bf16 peak ("bf16-equivalent"), as torchtitan does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from errors import UserError

RECIPES = ("tensorwise", "rowwise")
KEPT_HEAD = "output head: the fused loss reads its weight"
KEPT_NOT_16 = "a dimension not divisible by 16"
KEPT_SMALL = "below torchao's size threshold for the recipe"


class FP8Error(UserError):
    """FP8 asked for where it cannot run; one line naming the fix."""


def check_supported(recipe: str, device: torch.device, emulate: bool) -> None:
    """Raise FP8Error unless recipe can run on device (float8 tensor cores: CUDA sm_89 or newer)."""
    if recipe not in RECIPES:
        raise FP8Error(f"fp8={recipe!r} is not one of {', '.join(RECIPES)} (or '' for off)")
    if not emulate and device.type != "cuda":
        raise FP8Error(f"fp8={recipe} needs a CUDA GPU with float8 tensor cores (sm_89+); this run is on "
                       f"{device.type}. Use --fp8_emulate=True to test the numerics without them")
    if not emulate and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise FP8Error(f"fp8={recipe} needs float8 tensor cores (sm_89+: Ada, Hopper, Blackwell); "
                       f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. Train in bf16, or "
                       "use --fp8_emulate=True to test the numerics")
    _import_torchao()


def _import_torchao() -> None:
    """Import torchao.float8 quietly: its optional compiled kernels (unused here) log load failures."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise FP8Error("fp8 needs torchao: pip install torchao==0.18.0 (see requirements.txt)") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def plan(model: nn.Module, recipe: str, emulate: bool) -> dict[str, str]:
    """{linear name: 'fp8' or the reason it stays in high precision} for every nn.Linear of model."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.weight.shape  # (out_features, in_features)
        if not name.startswith("h."):
            out[name] = KEPT_HEAD
        elif n % 16 or k % 16:
            out[name] = KEPT_NOT_16
        elif not emulate and not _large_enough(recipe, n, k):
            out[name] = KEPT_SMALL
        else:
            out[name] = "fp8"
    return out


def _large_enough(recipe: str, n: int, k: int) -> bool:
    """torchao's H100 thresholds (torchao.float8._auto_filter_for_recipe): N outputs, K inputs."""
    if recipe == "tensorwise":
        return not (k <= 4096 and n <= 1024)
    return not (n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))


def convert(model: nn.Module, recipe: str, emulate: bool = False,
            fsdp: bool = False) -> tuple[dict[str, str], list[Callable[[object], None]]]:
    """Swap the linears that plan() marks 'fp8' for torchao Float8Linear, in place.

    Returns (the plan, the hooks to call after each optimizer step). fsdp with tensorwise: the weights
    are all-gathered in float8, and the one hook recomputes their scales (one fused amax for all of
    them) after each step, once the optimizer has changed the weights.
    """
    _import_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    overrides = {"emulate": emulate}
    if fsdp and recipe == "tensorwise":
        overrides["enable_fsdp_float8_all_gather"] = True
    config = Float8LinearConfig(**{**_config_fields(config), **overrides})
    decisions = plan(model, recipe, emulate)
    if not any(v == "fp8" for v in decisions.values()):
        raise FP8Error(f"fp8={recipe}: no linear of this model qualifies (all are below the size threshold "
                       "or not multiples of 16); train in bf16")
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: decisions.get(fqn) == "fp8")
    hooks = []
    if config.enable_fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        hooks.append(lambda run: precompute_float8_dynamic_scale_for_fsdp(model))
    return decisions, hooks


def _config_fields(config: object) -> dict:
    from dataclasses import fields

    return {f.name: getattr(config, f.name) for f in fields(config)}


def summary(decisions: dict[str, str]) -> str:
    """One line: how many linears convert, and how many stay in high precision for each reason."""
    reasons: dict[str, int] = {}
    for v in decisions.values():
        reasons[v] = reasons.get(v, 0) + 1
    n = reasons.pop("fp8", 0)
    kept = "".join(f"; {c} kept ({r})" for r, c in reasons.items())
    return f"{n} of {len(decisions)} linears in fp8{kept}"
