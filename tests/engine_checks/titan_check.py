"""
Checks run inside the torchtitan 0.2.2 venv (recipes/engine_venvs.sh torchtitan) by tests/test_recipes_engines.py.

    python titan_check.py CASE.json

CASE.json: {"check": "shapes"|"logits"|"dcp"|"loader"|"bad_toml", ...}; prints one JSON line of results.
Only torchtitan, torch and safetensors are imported here (plus our token_loader through the generated module).
"""

import importlib
import json
import os
import sys

import torch
from torchtitan.config import ConfigManager
from torchtitan.protocols import train_spec
from torchtitan.protocols.train_spec import get_train_spec


def load_recipe(recipe_dir: str, toml: str, extra: list[str] | None = None) -> tuple[object, object, object]:
    """(job config, train spec, model args) exactly as torchtitan's Trainer gets them."""
    jc = ConfigManager().parse_args(["--job.config_file", toml] + (extra or []))
    # Several recipes in one process: each has its own nanollm_titan module registering the same spec name.
    sys.modules.pop(jc.experimental.custom_import, None)
    train_spec._extra_train_specs.clear()
    sys.path.insert(0, recipe_dir)
    try:
        importlib.import_module(jc.experimental.custom_import)
    finally:
        sys.path.remove(recipe_dir)
    spec = get_train_spec(jc.model.name)
    args = spec.model_args[jc.model.flavor]
    args.update_from_config(jc)
    return jc, spec, args


def build(spec: object, args: object, device: str) -> torch.nn.Module:
    with torch.device(device):
        model = spec.model_cls(args)
    if device != "meta":
        with torch.no_grad():
            model.init_weights()
    return model


def shapes(case: dict) -> dict:
    """Parameter count and HF-named shapes of each recipe's meta-device model."""
    out = {}
    for name, (recipe_dir, toml) in case["recipes"].items():
        _, spec, args = load_recipe(recipe_dir, toml)
        model = build(spec, args, "meta")
        hf = spec.state_dict_adapter(args, None).to_hf(model.state_dict())
        out[name] = {"n_params": sum(p.numel() for p in model.parameters()),
                     "hf_shapes": {k: list(v.shape) for k, v in hf.items()}}
    return out


def from_hf_folder(spec: object, args: object, folder: str) -> torch.nn.Module:
    from safetensors.torch import load_file
    model = build(spec, args, "cpu")
    sd = spec.state_dict_adapter(args, None).from_hf(load_file(os.path.join(folder, "model.safetensors")))
    model.load_state_dict(sd)
    return model.eval()


def logits(case: dict) -> dict:
    """Logits of torchtitan's model loaded from our HF export, written to case['out']."""
    _, spec, args = load_recipe(case["dir"], case["toml"])
    model = from_hf_folder(spec, args, case["hf"])
    idx = torch.load(case["idx"], weights_only=True)
    with torch.no_grad():
        torch.save(model(idx), case["out"])
    return {"ok": True}


def dcp(case: dict) -> dict:
    """HF -> torchtitan -> DCP checkpoint -> fresh model -> HF safetensors dict, written to case['out']."""
    import torch.distributed.checkpoint as dist_cp
    _, spec, args = load_recipe(case["dir"], case["toml"])
    model = from_hf_folder(spec, args, case["hf"])
    dist_cp.save(model.state_dict(), checkpoint_id=case["ckpt"])
    fresh = build(spec, args, "cpu")
    sd = fresh.state_dict()
    dist_cp.load(sd, checkpoint_id=case["ckpt"])
    fresh.load_state_dict(sd)
    torch.save(spec.state_dict_adapter(args, None).to_hf(fresh.state_dict()), case["out"])
    return {"ok": True}


def loader(case: dict) -> dict:
    """Batches of the recipe's dataloader on each DP rank, and the same after a resume from its state."""
    jc, spec, _ = load_recipe(case["dir"], case["toml"])
    out = {}
    for rank in range(case["dp"]):
        dl = spec.build_dataloader_fn(dp_world_size=case["dp"], dp_rank=rank, tokenizer=None, job_config=jc)
        it = iter(dl)
        first = [next(it) for _ in range(case["n"])]
        state = dl.state_dict()
        rest = [next(it) for _ in range(case["n"])]
        dl2 = spec.build_dataloader_fn(dp_world_size=case["dp"], dp_rank=rank, tokenizer=None, job_config=jc)
        dl2.load_state_dict(state)
        it2 = iter(dl2)
        resumed = [next(it2) for _ in range(case["n"])]
        same = all(torch.equal(a[0]["input"], b[0]["input"]) and torch.equal(a[1], b[1]) for a, b in zip(rest, resumed))
        out[rank] = {"x": [b[0]["input"] for b in first + rest], "y": [b[1] for b in first + rest], "resumed": same}
    torch.save(out, case["out"])
    return {"ok": True}


def bad_toml(case: dict) -> dict:
    """torchtitan's own parser on a TOML with an unknown key: it must refuse."""
    try:
        load_recipe(case["dir"], case["toml"])
    except ValueError as e:
        return {"rejected": True, "message": str(e).splitlines()[0]}
    return {"rejected": False}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        case = json.load(f)
    print(json.dumps({"shapes": shapes, "logits": logits, "dcp": dcp, "loader": loader,
                      "bad_toml": bad_toml}[case["check"]](case)))
