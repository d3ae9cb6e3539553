"""finetune/train.py and finetune/config.py: the YAML schema, exact resume through checkpoint-N (PiSSA,
dropout, a refactor inside the window), checkpoint-best and save_total_limit, the checkpoint's PEFT
adapter in peft, DDP/ZeRO-1/FSDP2 on 2 gloo processes against one, and one-line errors."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import read_until, tiny_hf_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "finetune")

import finetune.train as ft  # noqa: E402
import hf_checkpoint  # noqa: E402
from finetune import build_lora, spectral, validate_config  # noqa: E402
from finetune.config import ConfigError, grad_accum_steps, interval_steps, load_config  # noqa: E402
from finetune.data import make_math  # noqa: E402


def _write_assets(out: str) -> dict:
    """Offline math data, a word-level tokenizer over it and a tiny random Llama (GQA 2:1) in one HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    make_math.write_dataset(os.path.join(out, "math"), n_train=64, n_test=8, seed=0)
    pre = pre_tokenizers.Whitespace()
    words = {"Question", "Answer", ":"}
    for split in ("train", "test"):
        with open(os.path.join(out, "math", "gsm8k", f"{split}.jsonl")) as f:
            for line in f:
                for v in json.loads(line).values():
                    words.update(w for w, _ in pre.pre_tokenize_str(str(v)))
    vocab = ["<unk>", "<s>", "</s>", *sorted(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    model_dir = os.path.join(out, "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(model_dir)
    # std=0.02: transformers' initializer_range, the scale this run's losses were written against
    tiny_hf_llama(model_dir, std=0.02, vocab_size=len(vocab), intermediate_size=64, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2)
    return {"model": model_dir, "train": os.path.join(out, "math", "gsm8k", "train.jsonl"),
            "test": os.path.join(out, "math", "gsm8k", "test.jsonl")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return _write_assets(str(tmp_path_factory.mktemp("ft_assets")))


def _config(assets: dict, path, out_dir, **sections) -> str:
    """A tiny run: PiSSA + rsLoRA r=4, dropout 0.05, 8 steps of 4 examples, a refactor every 3 steps."""
    cfg = {
        "model": {"name_or_path": assets["model"]},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "use_rslora": True, "init": "pissa"},
        "dataset": {"source": assets["train"], "eval_source": assets["test"], "max_length": 256,
                    "answer_eval_samples": 4, "max_new_tokens": 8},
        "training": {"output_dir": str(out_dir), "max_steps": 8, "per_device_train_batch_size": 2,
                     "effective_batch_size": 4, "learning_rate": 3e-3, "warmup_ratio": 0.1, "logging_steps": 1,
                     "eval_steps": 4, "save_steps": 4, "device": "cpu"},
        "trainer": {"name": "SpectralRefactorTrainer", "refactor_every": 3},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _log(out_dir) -> dict:
    (path,) = glob.glob(os.path.join(str(out_dir), "run_*.json"))
    with open(path) as f:
        return json.load(f)


def _losses(log: dict) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in log["training_iterations"]}


def _adapters(ckpt) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(str(ckpt), "model.pt"), weights_only=True)


def _run(argv: list[str]) -> int:
    return ft.main(argv)


# -- config ---------------------------------------------------------------------------------------


def test_relative_paths_in_a_config_are_read_from_its_folder(tmp_path, monkeypatch):
    """Planted: with the paths read from the current folder (the rule before), the first assert fails, since the
    command runs from elsewhere; the error names the config, the path as written and where it was looked for."""
    folder = tmp_path / "configs" / "run"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "t.jsonl").write_text('{"question": "q", "answer": "a #### 1"}\n')
    (folder / "base").mkdir()
    (folder / "c.yaml").write_text("model: {name_or_path: base}\ndataset: {source: data/t.jsonl, eval_source: "
                                   "data/t.jsonl}\ntraining: {output_dir: out}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(folder / "c.yaml"))
    assert cfg.dataset.source == cfg.dataset.eval_source == str(folder / "data" / "t.jsonl")
    assert cfg.model.name_or_path == str(folder / "base")
    assert cfg.training.output_dir == "out"  # an output, like HF Trainer's: relative to the current folder
    # an override is a shell argument: relative to the current folder, as written
    cfg = load_config(str(folder / "c.yaml"), ["dataset.source=mine.jsonl", "model.name_or_path=org/name"])
    assert cfg.dataset.source == "mine.jsonl" and cfg.model.name_or_path == "org/name"
    (folder / "c.yaml").write_text("model: {name_or_path: org/name}\ndataset: {source: data/t.jsonl, eval_source: gsm8k}\n")
    assert load_config(str(folder / "c.yaml")).model.name_or_path == "org/name"  # a hub id stays as written
    (folder / "c.yaml").write_text("dataset: {source: ../t.jsonl}\n")
    assert load_config(str(folder / "c.yaml"), ["dataset.source=x.jsonl", "dataset.eval_source=gsm8k",
                                                "model.name_or_path=m"]).dataset.source == "x.jsonl"  # overridden
    with pytest.raises(ConfigError) as e:
        load_config(str(folder / "c.yaml"))
    message = str(e.value)
    assert "dataset.source=../t.jsonl" in message and str(folder / "c.yaml") in message
    assert str(tmp_path / "configs" / "t.jsonl") in message and "\n" not in message


def test_config_types_overrides_and_derived_counts(assets, tmp_path):
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "o")
    cfg = load_config(path, ["training.learning_rate=1e-4", "--lora.target_modules=[q_proj,v_proj]",
                             "training.save_steps=0.1"])
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert ft.lora_config(cfg).target_modules == ("q_proj", "v_proj") and ft.lora_config(cfg).scaling == 4.0
    assert grad_accum_steps(cfg, 1) == 2 and grad_accum_steps(cfg, 2) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        grad_accum_steps(cfg, 3)
    assert interval_steps(0.1, 6172) == 617 and interval_steps(12, 586) == 12 and interval_steps(0.001, 10) == 1
    # the Llama-3.1 LoRA guide's two configs load, with its hyperparameter table
    for name, lr, batch, epochs, warmup, every in (("metamath", 1e-4, 128, 2, 0.05, 200),
                                                     ("gsm8k", 3e-4, 64, 5, 0.1, 100)):
        c = load_config(os.path.join(FINETUNE, "configs", "Llama-3.1", f"llama3.1_8b_{name}.yaml"))
        t = c.training
        assert (t.learning_rate, t.effective_batch_size, t.num_train_epochs, t.warmup_ratio) == (lr, batch, epochs, warmup)
        assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.use_rslora, c.lora.init) == (32, 64, 0.05, True, "pissa")
        assert c.dataset.max_length == 1024 and c.trainer.refactor_every == every
        assert grad_accum_steps(c, 8) == batch // 32  # 4 per device x 8 GPUs x {4, 2}


def test_schedule_refactor_steps_and_rewarm():
    """The LoRA guide's GSM8K run: 586 steps, warmup ceil(0.1 x 586) = 59 from 0 as HF Trainer's (step k at
    peak * k / 59; tests/test_finetune_vs_hf.py checks it against the Trainer), then loop.get_lr's cosine;
    refactors every 100 steps after warmup; a resetting refactor re-warms the LR linearly over
    refactor_rewarm_steps; keep does not."""
    import loop as shared

    cfg = load_config(os.path.join(FINETUNE, "configs", "Llama-3.1", "llama3.1_8b_gsm8k.yaml"),
                      ["trainer.refactor_opt_state=reset", "trainer.refactor_rewarm_steps=4"])
    total, warmup = 586, ft.warmup_steps(cfg, 586)
    tr, t = cfg.trainer, cfg.training
    assert warmup == 59 and spectral.refactor_steps(tr.refactor_every, tr.refactor_start, total, warmup) == [
        100, 200, 300, 400, 500]
    lr = ft.make_lr(t.lr_scheduler_type, t.learning_rate, t.learning_rate * t.min_lr_ratio, total, warmup, [100, 200],
                    spectral.rewarm_steps(tr.refactor_opt_state, tr.refactor_rewarm_steps))
    base = [shared.get_lr(it, 3e-4, 59, 586, 0.0) for it in range(total)]
    assert lr(0) == 0 and lr(1) == 3e-4 / 59 and lr(58) == 3e-4 * 58 / 59 and lr(59) == base[59] == 3e-4
    assert lr(99) == base[99] and lr(585) == base[585]
    assert [lr(100 + k) for k in range(5)] == [base[100 + k] * (k + 1) / 5 for k in range(4)] + [base[104]]
    keep = load_config(os.path.join(FINETUNE, "configs", "Llama-3.1", "llama3.1_8b_gsm8k.yaml"),
                       ["trainer.refactor_opt_state=keep"])
    k = keep.trainer
    assert ft.make_lr(t.lr_scheduler_type, t.learning_rate, t.learning_rate * t.min_lr_ratio, total, warmup, [100],
                      spectral.rewarm_steps(k.refactor_opt_state, k.refactor_rewarm_steps))(100) == base[100]


def test_accumulation_weighs_micro_batches_by_their_targets():
    """loop.forward_backward: 2 micro-batches of 2 padded SFT rows (4 and 24 targets) give the loss and gradients
    of the 4 rows in one batch, the mean over the step's targets (HF Trainer's num_items_in_batch). Planted
    here: the mean of the two micro-batch means (each weighed 1 / accum) is 0.017 off that loss, so fails."""
    import torch.nn.functional as F
    from conftest import tiny_gpt

    import loop
    import parallel

    torch.manual_seed(0)
    model = tiny_gpt()
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    y[:2, :14] = -1  # two short answers, 2 targets each
    y[2:, -4:] = -1  # two long ones, 12 targets each, then padding

    class Batches:
        def __init__(self, batches: list) -> None:
            self.batches = batches

        def next_batch(self):
            return self.batches.pop(0)

    def step(accum: int, batches: list) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        lp = loop.Loop(parallel.Dist(0, 0, 1, torch.device("cpu")), model, model, None, Batches(batches), None,
                       accum=accum, max_iters=1, lr_at=float, evaluate_and_save=None, save=None)
        loss, tokens = loop.forward_backward(lp)
        assert tokens == 64
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    one, grads_one = step(1, [(x, y)])
    two, grads_two = step(2, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert (y[:2] != -1).sum() == 4 and (y[2:] != -1).sum() == 24
    assert two == pytest.approx(one, abs=1e-6)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        means = [F.cross_entropy(model(x[i:i + 2])[0].flatten(0, 1), y[i:i + 2].flatten(), ignore_index=-1)
                 for i in (0, 2)]
    assert abs((means[0] + means[1]).item() / 2 - one) > 0.01


@pytest.mark.parametrize("override, message", [
    ("training.learnig_rate=1e-4", "unknown config key 'training.learnig_rate' (did you mean 'learning_rate'?)"),
    ("trainr.name=Trainer", "(did you mean 'trainer'?)"),
    ("lora.r=four", "lora.r='four' is not an integer"),
    ("lora.init=pisa", "lora init='pisa'"),
    ("lora.target_modules=[q_prj]", "(did you mean 'q_proj'?)"),
    ("training.dataloader_num_workers=8", "training.dataloader_num_workers is not supported"),
    ("trainer.refactor_mode=spectral", "refactor mode='spectral' must be one of balanced, exact, clamp"),
    ("training.save_steps=1.5", "a fraction of training below 1 or a whole number"),
    # Hugging Face keys that mean something else here, and a key in the wrong section
    ("training.evaluation_strategy=steps", "(a Hugging Face key): evaluation here is by steps: set training.eval_steps"),
    ("training.optim=adamw_torch", "the optimizer is always AdamW"),
    ("training.lr=1e-4", "the key is training.learning_rate"),
    ("training.r=8", "unknown config key 'training.r': r belongs to section lora; write lora.r"),
    ("lora.learning_rate=1e-4", "learning_rate belongs to section training; write training.learning_rate"),
    # a local training file with no held-out eval file would be scored on its own training data
    ("dataset.eval_source=null", "dataset.eval_source is not set, so evaluation would score the training data"),
    # delta's new factors are not a change of basis of the old ones, so Adam's first moments have no map
    ("trainer.refactor_mode=delta trainer.refactor_opt_state=map_first_moment", "mode=delta is not a change of basis"),
])
def test_bad_config_is_one_error_line(override, message, assets, tmp_path, capsys):
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "o")
    assert _run(["--config", path, *override.split()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(tmp_path / "o")  # failed before any work


def test_bad_flags_and_files_from_the_command_line(assets, tmp_path):
    """The real CLI (python train.py from finetune/): one error line, exit 2, no traceback."""
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "o")
    cases = [(["--config", str(tmp_path / "missing.yaml")], "config file not found"),
             (["--config", path, "--resume_from_checkpoint", str(tmp_path)], "is not a checkpoint folder"),
             (["--config", path, "--resume_from_checkpont=x"], "unknown flag --resume_from_checkpont (did you mean '--resume_from_checkpoint'?)"),
             (["--resume_from_checkpoint", "x"], "the following arguments are required: --config")]
    for argv, message in cases:
        p = subprocess.run([sys.executable, "train.py", *argv], cwd=FINETUNE, capture_output=True, text=True,
                           timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr[-2000:]
        assert "Traceback" not in p.stderr


# -- runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> dict:
    """8 steps straight, saving checkpoint-4 and checkpoint-8; refactors after steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("straight")
    path = _config(assets, tmp / "c.yaml", tmp / "out")
    assert _run(["--config", path]) == 0
    return {"config": path, "out": tmp / "out", "log": _log(tmp / "out")}


def test_exact_resume_with_pissa_dropout_and_a_refactor(straight, tmp_path):
    """Resuming from checkpoint-4 in a fresh process state gives steps 4..7 and the final adapters bit for bit."""
    out = tmp_path / "resumed"
    assert _run(["--config", straight["config"], f"training.output_dir={out}",
                 "--resume_from_checkpoint", str(straight["out"] / "checkpoint-4")]) == 0
    ref, got = _losses(straight["log"]), _losses(_log(out))
    assert sorted(got) == [4, 5, 6, 7]
    assert all(got[i] == ref[i] for i in got), (got, ref)
    refactors = [e["iter"] for e in straight["log"]["events"] if e["event"] == "spectral_refactor"]
    assert refactors == [3, 6] and [e["iter"] for e in _log(out)["events"] if e["event"] == "spectral_refactor"] == [6]
    a, b = _adapters(straight["out"] / "checkpoint-8"), _adapters(out / "checkpoint-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(straight["out"] / "checkpoint-8" / "optimizer.pt", weights_only=True)
    ob = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_resume_with_another_lora_shape_is_one_error_line(straight, tmp_path, capsys):
    assert _run(["--config", straight["config"], "lora.r=8", f"training.output_dir={tmp_path / 'o'}",
                 "--resume_from_checkpoint", str(straight["out"] / "checkpoint-4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit this config's model and lora sections" in err, err


def test_checkpoint_holds_adapters_not_the_base(straight):
    ckpt = straight["out"] / "checkpoint-8"
    sd, init = _adapters(ckpt), torch.load(ckpt / "lora_init.pt", weights_only=True)
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd) and init.keys() == sd.keys()
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_rank0.pt", "state.json"} <= set(
        os.listdir(ckpt))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["kind"] == "lora" and state["iter_num"] == 8 and state["loader"]["step"] == 8
    evals = straight["log"]["evaluations"]
    assert [e["iter"] for e in evals] == [0, 4, 8]
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the final adapter in output_dir too
        assert (straight["out"] / name).read_bytes() == (ckpt / name).read_bytes()
    assert all(0 <= e["eval/answer_accuracy"] <= 1 and 0 <= e["eval/token_accuracy"] <= 1 for e in evals)


def test_checkpoint_adapter_loads_in_peft_on_the_original_base(straight, assets):
    """The PEFT adapter of a PiSSA checkpoint (rank-2r conversion) on the unmodified HF base gives our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.lora import load_lora_state_dict

    ckpt = straight["out"] / "checkpoint-8"
    cfg = load_config(straight["config"])
    ours = build_lora.lora_model(hf_checkpoint.from_hf(assets["model"], dtype=torch.float32), ft.lora_config(cfg),
                                 cfg.training.seed, torch.load(ckpt / "lora_init.pt", weights_only=True))
    load_lora_state_dict(ours, _adapters(ckpt))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]), str(ckpt))
    x = torch.randint(3, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = ours.eval()(x)[0], theirs.eval()(x).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_best_checkpoint_and_save_total_limit(assets, tmp_path):
    """checkpoint-best follows the best eval (eval/loss here: no answer eval); only the newest 2 checkpoint-N stay."""
    out = tmp_path / "o"
    path = _config(assets, tmp_path / "c.yaml", out, dataset={"answer_eval_samples": 0},
                   training={"eval_steps": 2, "save_steps": 2, "save_total_limit": 2},
                   trainer={"name": "Trainer"})
    assert _run(["--config", path]) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == [
        "checkpoint-6", "checkpoint-8", "checkpoint-best"]
    log = _log(out)
    evals = {e["iter"]: e["eval/loss"] for e in log["evaluations"] if e["iter"] > 0}
    best = json.loads((out / "checkpoint-best" / "state.json").read_text())
    assert best["iter_num"] == min(evals, key=evals.get)
    assert [e["path"] for e in log["events"] if e["event"] == "checkpoint_removed"] == [
        str(out / "checkpoint-2"), str(out / "checkpoint-4")]


def _dumping_train(tmp_path, dumps) -> str:
    """finetune/train.py wrapped so that every rank saves its full adapters after each refactor."""
    script = tmp_path / "train_dumping.py"
    script.write_text(f"""import sys
sys.path.insert(0, {ROOT!r})
import torch
import finetune.train as ft
import parallel
from finetune import spectral
from finetune.lora import lora_state_dict

refactor, calls = spectral.refactor, []


def dumping(model, optimizer, layout, d, **settings):
    stats = refactor(model, optimizer, layout, d, **settings)
    calls.append(1)  # refactors run after steps 3 and 6 (refactor_every 3)
    full = {{k: parallel.full_tensor(v).detach().cpu() for k, v in lora_state_dict(model).items()}}
    torch.save(full, f"{dumps}/rank{{d.rank}}_step{{3 * len(calls)}}.pt")
    return stats


spectral.refactor = dumping
sys.exit(ft.main(sys.argv[1:]))
""")
    return str(script)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero1", "fsdp"])
def test_parallel_lora_matches_single_process(mode, assets, tmp_path):
    """2 gloo processes x 1 micro-step = 1 process x 2: the loss curve within 1e-5 through two refactors
    (dropout off: its masks depend on the rank), and every rank holds the same factors after each refactor.
    FSDP2 also resumes exactly from checkpoint-4. The ranks' batches hold unequal target counts, so each rank
    must weigh its loss by the step's targets over both ranks: planted once in loop.forward_backward, each rank's
    own mean (DDP then averaging the two) is 1.0e-3 off at step 0, and no sum over ranks 5.5."""
    single, multi = tmp_path / "single", tmp_path / mode
    no_dropout = {"lora": {"dropout": 0.0}, "dataset": {"answer_eval_samples": 0}}
    assert _run(["--config", _config(assets, tmp_path / "s.yaml", single, **no_dropout)]) == 0
    path = _config(assets, tmp_path / "m.yaml", multi, training={"parallel": mode}, **no_dropout)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        _dumping_train(tmp_path, dumps), "--config", path], cwd=FINETUNE, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # every rank's full factors after each refactor, dumped by the test's own wrapper (not the run's
    # ranks_identical flag): bitwise equal across ranks
    for step in (3, 6):
        r0, r1 = (torch.load(dumps / f"rank{r}_step{step}.pt", weights_only=True) for r in (0, 1))
        assert r0.keys() == r1.keys() and r0 and all(torch.equal(r0[k], r1[k]) for k in r0), step
    ref, got = _losses(_log(single)), _losses(_log(multi))
    assert sorted(got) == list(range(8))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], abs=1e-5), (it, got[it], ref[it])
    refactors = [e for e in _log(multi)["events"] if e["event"] == "spectral_refactor"]
    assert [e["iter"] for e in refactors] == [3, 6] and all(e["ranks_identical"] for e in refactors)
    a, b = _adapters(single / "checkpoint-8"), _adapters(multi / "checkpoint-8")
    # The factors within 3e-5, 1% of one AdamW step at lr 3e-3: Adam's normalised update turns last-bit
    # differences of the reduced gradients (2-rank sum vs one process's accumulation) into ~1e-5 on an
    # element whose gradient is near zero (1.02e-5 measured on an AMD EPYC; below 1e-5 on an Intel CPU).
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=3e-5, rtol=0)
    if mode == "fsdp":  # and an exact resume of the sharded run (DCP optimizer state, gathered adapters)
        resumed = tmp_path / "resumed"
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", "--config", path, f"training.output_dir={resumed}",
                            "--resume_from_checkpoint", str(multi / "checkpoint-4")],
                           cwd=FINETUNE, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert _losses(_log(resumed)) == {i: got[i] for i in range(4, 8)}
        c = _adapters(resumed / "checkpoint-8")
        assert all(torch.equal(c[k], b[k]) for k in b)


def test_wandb_gets_the_lora_guides_metric_names(assets, tmp_path, monkeypatch):
    """report_to: [wandb] logs train/loss, train/learning_rate, train/grad_norm and eval/* (a stand-in wandb)."""
    import types

    logged: list[dict] = []
    run = types.SimpleNamespace(log=lambda rec, step: logged.append(rec), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "o", dataset={"answer_eval_samples": 2},
                   training={"max_steps": 2, "eval_steps": 2, "save_steps": 2, "report_to": ["wandb"]})
    assert _run(["--config", path]) == 0
    keys = set().union(*logged)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/token_accuracy",
            "eval/answer_accuracy"} <= keys and "loss" not in keys


def test_activation_checkpointing_gives_the_same_run(straight, assets, tmp_path):
    """gradient_checkpointing: true recomputes each block in backward (dropout masks replayed): same losses."""
    out = tmp_path / "gc"
    path = _config(assets, tmp_path / "c.yaml", out, training={"gradient_checkpointing": True, "max_steps": 8})
    assert _run(["--config", path]) == 0
    ref, got = _losses(straight["log"]), _losses(_log(out))
    assert got.keys() == ref.keys()
    for it in ref:
        assert got[it] == pytest.approx(ref[it], abs=1e-6)


@pytest.mark.gpu
def test_gpu_bf16_run_trains_fp32_adapters_on_a_bf16_base(assets, tmp_path):
    """On CUDA with bf16: the base is bf16, the adapters stay fp32 masters, the loss falls, eval decodes."""
    out = tmp_path / "gpu"
    path = _config(assets, tmp_path / "c.yaml", out, trainer={"name": "Trainer"},
                   training={"device": "cuda", "bf16": True, "max_steps": 16, "learning_rate": 1e-2,
                             "gradient_checkpointing": True, "eval_steps": 8, "save_steps": 8})
    assert _run(["--config", path]) == 0
    log = _log(out)
    assert log["environment"]["dtype"] == "torch.bfloat16"
    loss = _losses(log)
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    evals = log["evaluations"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.05
    assert all(r["memory_peak_gb"] is not None for r in log["training_iterations"])
    assert all(v.dtype == torch.float32 for v in _adapters(out / "checkpoint-16").values())
    assert [e["iter"] for e in log["evaluations"]] == [0, 8, 16]


# -- what a person can do wrong: overwrite, resume latest, a kill -9 -----------------------------------


def _copy_run(straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight["out"], out)
    return out


def test_a_new_run_refuses_an_output_dir_that_holds_a_trained_run(straight, tmp_path, capsys):
    out = _copy_run(straight, tmp_path)
    before = _adapters(out / "checkpoint-8")
    assert _run(["--config", straight["config"], f"training.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a trained run" in err, err
    assert "--resume_from_checkpoint latest" in err and "training.overwrite_output_dir=true" in err
    after = _adapters(out / "checkpoint-8")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _run(["--config", straight["config"], f"training.output_dir={out}", "training.max_steps=4",
                 "training.overwrite_output_dir=true"]) == 0
    assert not (out / "checkpoint-8").exists() and (out / "checkpoint-4").is_dir()  # the old run is gone


def test_resume_latest_takes_the_newest_checkpoint_and_writes_the_final_adapter(straight, tmp_path):
    """A run killed just after its last checkpoint-N never wrote the adapter into output_dir: resuming from
    that checkpoint writes it. `latest` and the output_dir itself both mean the newest complete checkpoint-N."""
    out = _copy_run(straight, tmp_path)
    for name in ft.ADAPTER_FILES:
        os.remove(out / name)
    shutil.copytree(out / "checkpoint-8", out / "checkpoint-9.tmp")  # an unfinished save is not a checkpoint
    assert ft.resolve_resume("latest", str(out)) == str(out / "checkpoint-8")
    assert ft.resolve_resume(str(out), "elsewhere") == str(out / "checkpoint-8")
    assert _run(["--config", straight["config"], f"training.output_dir={out}", "--resume_from_checkpoint",
                 "latest"]) == 0
    for name in ft.ADAPTER_FILES:
        assert (out / name).read_bytes() == (straight["out"] / name).read_bytes()


def test_resume_latest_with_nothing_to_resume_is_one_error_line(assets, tmp_path, capsys):
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "empty")
    assert _run(["--config", path, "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no complete checkpoint-N folder yet" in err, err


@pytest.mark.slow
def test_kill_9_inside_a_save_then_resume_latest_gives_the_same_adapters(straight, tmp_path):
    """Chaos: SIGKILL inside the run's 3rd save (after checkpoint-best and checkpoint-4 were written);
    --resume_from_checkpoint latest ends with the adapters of the run that was never killed, bit for bit."""
    out = tmp_path / "out"
    argv = ["--config", straight["config"], f"training.output_dir={out}"]
    env = {**os.environ, "NANOLLM_CRASH_AT": "after_model:3:kill"}
    p = subprocess.run([sys.executable, "train.py", *argv], cwd=FINETUNE, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (out / "checkpoint-4" / "state.json").is_file() and glob.glob(str(out / "checkpoint-*.tmp"))
    p = subprocess.run([sys.executable, "train.py", *argv, "--resume_from_checkpoint", "latest"], cwd=FINETUNE,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    a, b = _adapters(straight["out"] / "checkpoint-8"), _adapters(out / "checkpoint-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not glob.glob(str(out / "checkpoint-*.tmp"))


@pytest.mark.slow
def test_sigterm_mid_run_saves_names_the_checkpoint_and_the_resume_finishes_the_run(assets, tmp_path):
    """SIGTERM once the run prints its 3rd step: it saves checkpoint-N, names it, exits 130; resuming `latest`
    goes on from N (no step repeated or skipped) to the end and writes the final adapter. Planted: a resume
    that starts again from step 0, or stops at N, fails the step list below."""
    out = tmp_path / "out"
    path = _config(assets, tmp_path / "c.yaml", out, training={"max_steps": 10, "eval_steps": 10, "save_steps": 10})
    p = subprocess.Popen([sys.executable, "train.py", "--config", path], cwd=FINETUNE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        read_until(p, "iter 2:")
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    (line,) = [ln for ln in rest.splitlines() if ln.startswith("interrupted at iter")]
    it = int(line.split()[3].rstrip(";"))
    assert p.returncode == 130 and f"saved {out}/checkpoint-{it}: resume with --resume_from_checkpoint latest" in line
    assert (out / f"checkpoint-{it}" / "state.json").is_file() and 3 <= it < 10
    first = sorted(_losses(_log(out)))
    assert first == list(range(it))
    os.remove(glob.glob(str(out / "run_*.json"))[0])  # the resumed run's log alone below
    r = subprocess.run([sys.executable, "train.py", "--config", path, "--resume_from_checkpoint", "latest"],
                       cwd=FINETUNE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(_losses(_log(out))) == list(range(it, 10))
    assert (out / "checkpoint-10" / "state.json").is_file() and all((out / f).is_file() for f in ft.ADAPTER_FILES)


# -- a CLI that talks: progress, messages, templates, evaluation off -----------------------------------


def test_a_normal_run_shows_its_progress_and_no_warnings(assets, tmp_path):
    """What a user sees on a terminal: progress bars on stderr for the long phases and nothing else there (no
    library warnings), log lines with the time the remaining steps take, the refactor steps said plainly;
    and torchao is not even imported (it is for FP8 only)."""
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "out")
    code = (f"import sys; sys.path.insert(0, '..'); import finetune.train as ft; rc = ft.main(['--config', {path!r}]); "
            "print('torchao imported' if 'torchao' in sys.modules else 'torchao not imported'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=FINETUNE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "torchao not imported" in p.stdout
    assert "spectral refactor (delta) after steps 3, 6" in p.stdout
    assert "iter 1:" in p.stdout and "steps left 6 (~" in p.stdout  # after the first timed window
    segments = [seg.strip() for seg in p.stderr.replace("\r", "\n").splitlines() if seg.strip()]
    bars = ("tokenizing", "evaluating", "decoding answers")
    assert {b for b in bars if any(seg.startswith(b) for seg in segments)} == set(bars)
    assert [seg for seg in segments if not seg.startswith(bars)] == []


def test_steps_text():
    assert ft._steps_text([10]) == "10" and ft._steps_text([3, 6]) == "3, 6"
    assert ft._steps_text([100, 200, 300, 400, 500]) == "100, 200, ..., 500 (every 100)"


def test_evaluation_can_be_turned_off(assets, tmp_path, capsys):
    path = _config(assets, tmp_path / "c.yaml", tmp_path / "out", training={"eval_steps": 0})
    assert _run(["--config", path]) == 0
    assert "no evaluation (training.eval_steps=0)" in capsys.readouterr().out
    log = _log(tmp_path / "out")
    assert log["evaluations"] == [] and not (tmp_path / "out" / "checkpoint-best").exists()
    assert (tmp_path / "out" / "checkpoint-8").is_dir() and (tmp_path / "out" / "adapter_config.json").is_file()


def test_inference_uses_the_template_the_adapter_was_trained_with(straight, assets, capsys):
    """Every adapter carries its training template (prompt_template.json); inference.py reads it when
    --template is not given, and says so when there is none."""
    from finetune import inference

    ckpt = straight["out"] / "checkpoint-8"
    assert json.loads((ckpt / "prompt_template.json").read_text()) == {"template": "qa"}
    argv = ["--model_path", assets["model"], "--adapter_path", str(ckpt), "--prompt", "What is 2 + 3?",
            "--max_new_tokens", "8", "--device", "cpu"]
    assert inference.main(argv) == 0
    default = capsys.readouterr()
    assert inference.main([*argv, "--template", "qa"]) == 0
    assert default.out == capsys.readouterr().out and default.err == ""
    assert inference.main(["--model_path", assets["model"], "--prompt", "What is 2 + 3?", "--max_new_tokens", "2",
                           "--device", "cpu"]) == 0
    assert "note: no prompt_template.json beside the model, so the prompt is sent as is" in capsys.readouterr().err


def test_merge_says_what_it_wrote_and_carries_the_template(straight, assets, tmp_path, capsys):
    from finetune import merge_adapter

    out = tmp_path / "merged"
    assert merge_adapter.main(["--base_model", assets["model"], "--adapter_path",
                               str(straight["out"] / "checkpoint-8"), "--output_path", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote the merged model {out}: the base {assets['model']} with the adapter ")
    assert json.loads((out / "prompt_template.json").read_text()) == {"template": "qa"}


def _hf_answers(straight: dict, assets: dict, test_file: str) -> tuple[list[str], list[dict]]:
    """The completions of checkpoint-8's PEFT adapter with transformers' generate on test_file's answer-eval
    examples, each cut where ours stops (EOS, or the end of a complete `#### N` line); and the examples."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.answers import answer_line_complete
    from finetune.sft_data import load_examples

    cfg = load_config(straight["config"])
    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["model"]),
                                      str(straight["out"] / "checkpoint-8")).eval()
    examples = [e for e in load_examples(test_file, "test") if e["answer"] is not None]
    examples = examples[:cfg.dataset.answer_eval_samples]
    texts = []
    for e in examples:
        ids = tok(e["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=cfg.dataset.max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        cut = next((n for n in range(1, len(new) + 1) if answer_line_complete(tok.decode(new[:n]))), len(new))
        texts.append(tok.decode(new[:cut], skip_special_tokens=True))
    return texts, examples


def test_logged_answer_accuracy_equals_hf_peft_decoding(straight, assets):
    """eval/answer_accuracy at step 8 (strict and flexible), recomputed from the checkpoint's PEFT adapter
    with transformers' generate and the answer extraction of answers.py. Not just 0 <= accuracy <= 1; the
    test below checks it where it is not zero."""
    from finetune.answers import answer_accuracy

    texts, examples = _hf_answers(straight, assets, assets["test"])
    want = answer_accuracy(texts, [e["answer"] for e in examples])
    (logged,) = [e for e in straight["log"]["evaluations"] if e["iter"] == 8]
    assert logged["eval/answer_accuracy"] == want["strict"]
    assert logged["eval/answer_accuracy_flexible"] == want["flexible"]


def test_answer_accuracy_where_it_is_not_zero(straight, assets, tmp_path, capsys):
    """A tiny random model answers no problem right, so accuracy 0 = 0 would pass a broken count. Here the gold
    answers of half the examples are rewritten to the number the model itself ends with: our evaluation
    (validate_config --checkpoint) must give the nonzero strict and flexible accuracy that transformers'
    decoding and answers.py give. Planted: gold answers left as they were give 0 and fail the first assert."""
    from finetune.answers import answer_accuracy, extract_last_number

    texts, examples = _hf_answers(straight, assets, assets["test"])
    rows = [json.loads(line) for line in open(assets["test"])]
    rigged = 0
    for i, text in enumerate(texts[: len(texts) // 2 + 1]):
        number = extract_last_number(text)
        if number is not None:  # the examples are the file's first rows (every row has a `#### N` answer)
            rows[i]["answer"] = rows[i]["answer"].rsplit("####", 1)[0] + f"#### {number}"
            rigged += 1
    path = tmp_path / "rigged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts2, examples2 = _hf_answers(straight, assets, str(path))
    assert texts2 == texts  # the prompts did not change
    want = answer_accuracy(texts, [e["answer"] for e in examples2])
    assert rigged and want["flexible"] > 0, "the model ends no completion with a number: nothing to rig"
    capsys.readouterr()
    assert validate_config.main(["--config", straight["config"], "--checkpoint", str(straight["out"] / "checkpoint-8"),
                                 "--device", "cpu", f"dataset.eval_source={path}", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    assert metrics["eval/answer_accuracy_flexible"] == want["flexible"] > 0
    assert metrics["eval/answer_accuracy"] == want["strict"]
