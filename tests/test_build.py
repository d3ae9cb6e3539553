"""The benches build what the entry points build: each bench's model, train_model and optimizer, caught at its
first training step, equal the entry point's own build (build.build for train.py, finetune/train.py's
build_model) on a tiny config. A bench that copied the build and drifted (a missing optimizer epsilon, another
seed, another wrapping) fails here."""

import json
import os

import torch

import build
import configurator
import loop
import optim
import parallel
from model import GPT, ModelConfig
from train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE_CONFIG = os.path.join(ROOT, "finetune", "configs", "Llama-3.1", "llama3.1_8b_metamath.yaml")


def _first_step(monkeypatch) -> dict:
    """What the next loop.train_step is handed, recorded before it steps: the raw model's state, the
    train_model's type and the optimizer's type and hyperparameters."""
    seen: dict = {}
    real = loop.train_step

    def spy(lp: loop.Loop, run: loop.RunState, mark=None):
        if not seen:
            seen.update(_built(lp.model, lp.train_model, lp.optimizer))
        return real(lp, run, mark)

    monkeypatch.setattr(loop, "train_step", spy)
    return seen


def _built(model: torch.nn.Module, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    inner = optim.local_optimizer(optimizer)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "train_model": type(train_model), "optimizer": type(optimizer),
            "groups": [{k: v for k, v in g.items() if k != "params"} | {"sizes": [p.numel() for p in g["params"]]}
                       for g in inner.param_groups]}


def _assert_same(bench: dict, entry: dict) -> None:
    assert bench["optimizer"] is entry["optimizer"] and bench["train_model"] is entry["train_model"]
    assert bench["groups"] == entry["groups"]  # lr, betas, eps, weight decay, fused, and each group's parameters
    assert bench["trainable"] == entry["trainable"] and bench["state"].keys() == entry["state"].keys()
    for k, v in entry["state"].items():
        assert torch.equal(bench["state"][k], v), k


def test_gpu_step_builds_what_train_py_builds(monkeypatch, capsys):
    from bench import gpu_step

    argv = ["config/tiny_llama3.py", "--smoke=True", "--n_layer=2", "--block_size=32", "--batch_size=2",
            "--learning_rate=3e-3", "--weight_decay=0.05", "--beta2=0.95", "--seed=7", "--compile=False"]
    seen = _first_step(monkeypatch)
    monkeypatch.chdir(ROOT)
    gpu_step.run(argv)
    loop.finish()
    (tc, mc, _), _ = configurator.load(argv, [TrainConfig, ModelConfig, gpu_step.BenchConfig])
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    model, train_model, optimizer, _, _ = build.build(tc, mc, d, torch.float32, None)
    _assert_same(seen, _built(model, train_model, optimizer))
    assert seen["groups"][0]["lr"] == 3e-3 and seen["groups"][0]["betas"] == (0.9, 0.95)  # the flags reached it


def test_lora_memory_builds_what_finetune_train_builds(monkeypatch, capsys):
    import finetune.train as ft
    from bench import lora_memory
    from bench.lora_step import PRESETS
    from finetune.config import load_config

    overrides = ["dataset.max_length=32", "training.per_device_train_batch_size=2", "training.adam_epsilon=1e-6",
                 "training.weight_decay=0.1"]
    argv = [FINETUNE_CONFIG, "--preset", "smoke", "--device", "cpu", "--steps", "1", *overrides]
    seen = _first_step(monkeypatch)
    torch.manual_seed(0)  # the bench's random base is drawn from the global generator
    assert lora_memory.run(argv) == 0
    assert json.loads(capsys.readouterr().out)["losses"]

    # finetune/train.py's build_model over the same random base (its only difference: no hub download)
    cfg = load_config(FINETUNE_CONFIG, [*overrides, "lora.init=gaussian", "training.device=cpu"])
    torch.manual_seed(0)
    with torch.device("meta"):
        base = GPT(ModelConfig(block_size=cfg.dataset.max_length, **PRESETS["smoke"]))
    base.to_empty(device="cpu")
    base.init_weights()
    monkeypatch.setattr(ft.hf_checkpoint, "from_hf", lambda path, dtype: base.to(dtype))
    d = parallel.Dist(0, 0, 1, torch.device("cpu"))
    model, train_model, optimizer = ft.build_model(cfg, "unused", d, parallel.layout(d, zero1=False, fsdp=False),
                                                   torch.float32, None, None, None)
    entry = _built(model, train_model, optimizer)
    _assert_same(seen, entry)
    assert all(g["eps"] == 1e-6 for g in entry["groups"])  # the config's epsilon, which the benches once dropped


def test_the_parallel_layout_answers_what_is_sharded():
    cpu = torch.device("cpu")
    one, two = parallel.Dist(0, 0, 1, cpu), parallel.Dist(1, 1, 2, cpu)
    made = {(d.world_size, zero1, fsdp): parallel.layout(d, zero1=zero1, fsdp=fsdp)
            for d in (one, two) for zero1 in (False, True) for fsdp in (False, True)}
    names = {k: v.name for k, v in made.items()}
    assert names == {(1, False, False): "single", (1, True, False): "single",  # ZeRO-1 over one process: AdamW
                     (1, False, True): "fsdp", (1, True, True): "fsdp",
                     (2, False, False): "ddp", (2, True, False): "zero1", (2, False, True): "fsdp", (2, True, True): "fsdp"}
    zero1, fsdp, ddp = made[(2, True, False)], made[(2, False, True)], made[(2, False, False)]
    assert zero1.shard_optimizer and not zero1.shard_params and zero1.per_rank_optimizer_state
    assert fsdp.shard_params and not fsdp.shard_optimizer and fsdp.per_rank_optimizer_state
    assert not ddp.per_rank_optimizer_state and not ddp.is_master and made[(1, False, False)].is_master
    assert (ddp.dp_rank, ddp.dp_size) == (1, 2)
    # what a checkpoint records reads back as the same sharding; single and DDP share one optimizer file
    for layout in made.values():
        saved = parallel.Layout.saved(layout.name, layout.dp_size)
        assert saved.name == layout.name and layout.same_sharding(saved)
    assert made[(1, False, False)].same_sharding(ddp) and not ddp.same_sharding(zero1)
    assert not zero1.same_sharding(fsdp) and parallel.Layout.saved("zero2", 2) is None
