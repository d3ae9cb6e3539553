"""SFT data: the offline math generator, loading, prompt masking, the batch stream, resume, eval and accuracy."""

import json
import os
import re

import pytest
import torch

FINETUNE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "finetune")

from finetune.data import make_math  # noqa: E402
from finetune.sft_data import (  # noqa: E402
    TEMPLATES,
    DataError,
    SFTLoader,
    eval_batches,
    load_examples,
    tokenize_examples,
)
from finetune.sft_eval import generate_answers, token_accuracy, token_accuracy_counts  # noqa: E402


@pytest.fixture(scope="module")
def math_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("math")
    make_math.write_dataset(str(out), n_train=96, n_test=16, seed=0)
    return out


@pytest.fixture(scope="module")
def qwen():
    from tokenizer import load_tokenizer

    return load_tokenizer("qwen3")


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_make_math_is_deterministic_correct_and_split(tmp_path, math_dir):
    make_math.write_dataset(str(tmp_path / "a"), 96, 16, seed=0)
    make_math.write_dataset(str(tmp_path / "b"), 96, 16, seed=1)
    for rel in ("gsm8k/train.jsonl", "gsm8k/test.jsonl", "metamathqa/train.jsonl", "metamathqa/test.jsonl"):
        assert (tmp_path / "a" / rel).read_bytes() == (math_dir / rel).read_bytes()
        assert (tmp_path / "b" / rel).read_bytes() != (math_dir / rel).read_bytes()
    train, test = _rows(math_dir / "gsm8k/train.jsonl"), _rows(math_dir / "gsm8k/test.jsonl")
    assert len(train) == 96 and len(test) == 16
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    meta = _rows(math_dir / "metamathqa/train.jsonl")
    for g, m in zip(train, meta):
        # every calculator annotation computes, the last one is the answer, and both formats agree
        calcs = re.findall(r"<<([^=]+)=([^>]+)>>", g["answer"])
        for expr, result in calcs:
            assert eval(expr) == float(result)
        gold = g["answer"].rsplit("#### ", 1)[1]
        assert float(calcs[-1][1]) == float(gold)
        assert m["query"] == g["question"] and m["response"].endswith(f"The answer is: {gold}")
        assert "<<" not in m["response"]
    assert not list(tmp_path.glob("a/*/.tmp-*"))  # atomic writes leave no temp files


def test_make_math_cli(tmp_path, capsys):
    assert make_math.main(["--out_dir", str(tmp_path), "--n_train", "3", "--n_test", "2"]) == 0
    assert len(_rows(tmp_path / "metamathqa/test.jsonl")) == 2
    assert make_math.main(["--out_dir", str(tmp_path), "--n_train", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --n_train")


def test_load_examples_both_formats_and_file_types(math_dir, tmp_path):
    g = load_examples(str(math_dir / "gsm8k/train.jsonl"), limit=5)
    m = load_examples(str(math_dir / "metamathqa/train.jsonl"), limit=5)
    raw = _rows(math_dir / "gsm8k/train.jsonl")[:5]
    assert len(g) == 5 and len(m) == 5
    assert g[0]["prompt"] == TEMPLATES["qa"].format(prompt=raw[0]["question"])
    assert m[0]["prompt"].startswith("Below is an instruction") and raw[0]["question"] in m[0]["prompt"]
    assert g[0]["response"] == raw[0]["answer"]
    assert [e["answer"] for e in g] == [e["answer"] for e in m] == [r["answer"].split("#### ")[1] for r in raw]
    assert load_examples(str(math_dir / "gsm8k/train.jsonl"), limit=2, template="plain")[0]["prompt"] == (
        raw[0]["question"] + "\n")

    # .json list, .parquet, and caller-named fields
    (tmp_path / "d.json").write_text(json.dumps(raw))
    assert load_examples(str(tmp_path / "d.json")) == g
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "d.parquet")
    assert load_examples(str(tmp_path / "d.parquet")) == g
    custom = [{"q": "What is 2 + 2?", "sol": "2 + 2 = 4", "gold": "4"}]
    (tmp_path / "c.jsonl").write_text(json.dumps(custom[0]) + "\n")
    ex = load_examples(str(tmp_path / "c.jsonl"), fields={"prompt": "q", "response": "sol", "answer": "gold"})
    assert ex == [{"prompt": "Question: What is 2 + 2?\nAnswer:\n", "response": "2 + 2 = 4", "answer": "4"}]


def test_load_examples_errors(tmp_path, math_dir):
    with pytest.raises(DataError, match="not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown data source"):
        load_examples("gsm8k_v2")
    (tmp_path / "c.jsonl").write_text(json.dumps({"q": "a", "sol": "b"}) + "\n")
    with pytest.raises(DataError, match="neither GSM8K"):
        load_examples(str(tmp_path / "c.jsonl"))
    with pytest.raises(DataError, match="fields must map"):
        load_examples(str(tmp_path / "c.jsonl"), fields={"question": "q"})
    with pytest.raises(DataError, match="unknown prompt template"):
        load_examples(str(math_dir / "gsm8k/train.jsonl"), template="chatml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        load_examples(str(tmp_path / "bad.json"))


def test_prompt_masking_with_our_tokenizer(qwen):
    ex = [{"prompt": "Question: 1 + 2?\nAnswer:\n", "response": "1 + 2 = 3\n#### 3", "answer": "3"}]
    [(ids, labels)] = tokenize_examples(ex, qwen, max_length=64)
    p, r = qwen.encode(ex[0]["prompt"]), qwen.encode(ex[0]["response"])
    assert qwen.bos_id is None  # Qwen adds no BOS
    assert ids == p + r + [qwen.eos_id]
    assert labels == [-1] * len(p) + r + [qwen.eos_id]
    # truncation keeps the prompt and cuts the response's end; a prompt that fills max_length is dropped
    [(ids8, labels8)] = tokenize_examples(ex, qwen, max_length=len(p) + 2)
    assert ids8 == ids[: len(p) + 2] and labels8 == labels[: len(p) + 2]
    with pytest.warns(UserWarning, match="1 of 1 examples"):
        assert tokenize_examples(ex, qwen, max_length=len(p)) == []


def _hf_tokenizer_folder(path) -> str:
    """A small word-level Hugging Face tokenizer that adds a BOS, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Question", ":", "what", "is", "1", "+", "2", "?", "Answer", "=", "3", "####"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def test_prompt_masking_with_a_hf_tokenizer_folder(tmp_path):
    folder = _hf_tokenizer_folder(tmp_path / "tok")
    ex = [{"prompt": "Question: what is 1 + 2 ?\nAnswer:\n", "response": "1 + 2 = 3\n#### 3", "answer": "3"}]
    [(ids, labels)] = tokenize_examples(ex, folder, max_length=64)
    assert ids == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 4] + [7, 8, 9, 12, 13, 14, 13] + [2]
    assert labels == [-1] * 11 + [7, 8, 9, 12, 13, 14, 13, 2]
    with pytest.raises(DataError, match="not found"):
        tokenize_examples(ex, str(tmp_path / "nope"), max_length=64)


def _toy(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n tokenized examples of varied lengths; example i's tokens all equal i + 1 (so rows name examples)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n_prompt, n_resp = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        ids = [i + 1] * (n_prompt + n_resp)
        out.append((ids, [-1] * n_prompt + ids[n_prompt:]))
    return out


def _example_of(x: torch.Tensor) -> list[int]:
    return (x[:, 0] - 1).tolist()


def test_batches_are_shifted_masked_and_padded():
    data = _toy(24)
    loader = SFTLoader(data, batch_size=4, grad_accum=1, seed=3, pad_id=0, pad_multiple=4)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape[1] % 4 == 0
    for row, i in enumerate(_example_of(x)):
        ids, labels = data[i]
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and y[row, :n].tolist() == labels[1:]
        assert (x[row, n:] == 0).all() and (y[row, n:] == -1).all()
    lengths = [len(data[i][0]) for i in _example_of(x)]
    assert lengths == sorted(lengths)  # length-bucketed within the step


def test_epochs_visit_every_example_once_in_a_new_order():
    data = _toy(26)  # 26 = 3 global batches of 8 + 2 left over
    loader = SFTLoader(data, batch_size=2, grad_accum=4, seed=7)
    assert loader.steps_per_epoch == 3
    epochs = []
    for e in range(3):
        assert loader.epoch == e
        seen = [i for _ in range(12) for i in _example_of(loader.next_batch()[0])]
        assert len(set(seen)) == 24
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]
    again = SFTLoader(data, batch_size=2, grad_accum=4, seed=7)
    assert [i for _ in range(12) for i in _example_of(again.next_batch()[0])] == epochs[0]
    other = SFTLoader(data, batch_size=2, grad_accum=4, seed=8)
    assert [i for _ in range(12) for i in _example_of(other.next_batch()[0])] != epochs[0]


def test_global_batch_is_independent_of_world_size():
    data = _toy(40)
    one = SFTLoader(data, batch_size=2, grad_accum=4, rank=0, world_size=1, seed=1)
    two = [SFTLoader(data, batch_size=2, grad_accum=2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(3 * 5):  # across epoch boundaries (5 steps per epoch)
        for _m in range(2):
            for r in range(2):  # 1 x 4 micro-step m * 2 + r is rank r's micro-step m of 2 x 2
                x1, y1 = one.next_batch()
                x2, y2 = two[r].next_batch()
                assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_exact_resume_mid_epoch():
    data = _toy(30)
    straight = SFTLoader(data, batch_size=3, grad_accum=2, seed=5)
    ref = [straight.next_batch() for _ in range(20)]  # 5 steps per epoch: crosses two epoch boundaries
    first = SFTLoader(data, batch_size=3, grad_accum=2, seed=5)
    for _ in range(7):  # mid-step, mid-epoch
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives the JSON sidecar
    resumed = SFTLoader(data, batch_size=3, grad_accum=2, seed=5)
    resumed.load_state_dict(state)
    for k in range(7, 20):
        x, y = resumed.next_batch()
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1])

    for bad in (SFTLoader(data, batch_size=3, grad_accum=2, seed=6), SFTLoader(data[:-1], 3, 2, seed=5),
                SFTLoader(_toy(30, seed=9), 3, 2, seed=5)):
        with pytest.raises(DataError, match="resume with the same"):
            bad.load_state_dict(state)
    with pytest.raises(DataError, match="mid-step"):
        SFTLoader(data, batch_size=6, grad_accum=1, seed=5).load_state_dict(state)


def test_loader_errors():
    with pytest.raises(DataError, match="do not fill one global batch"):
        SFTLoader(_toy(5), batch_size=2, grad_accum=2, world_size=2)
    with pytest.raises(DataError, match="rank"):
        SFTLoader(_toy(8), batch_size=2, rank=2, world_size=2)


def test_eval_batches_cover_the_set_once_across_ranks():
    data = _toy(11)
    per_rank = [eval_batches(data, batch_size=3, rank=r, world_size=2) for r in range(2)]
    seen = sorted(i for batches in per_rank for x, _ in batches for i in _example_of(x))
    assert seen == list(range(11))
    again = eval_batches(data, batch_size=3, rank=0, world_size=2)  # a fixed list
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(per_rank[0], again))
    assert len(eval_batches(data, batch_size=3, n_batches=2)) == 2


def test_token_accuracy_against_a_hand_computation():
    # 2 rows, 4 positions, vocab 5; argmax per position below, targets with -1 off the response
    argmax = torch.tensor([[1, 2, 3, 4], [0, 0, 2, 2]])
    logits = torch.nn.functional.one_hot(argmax, 5).float() * 3 + torch.rand(2, 4, 5)
    y = torch.tensor([[-1, 2, 0, 4], [-1, -1, 2, -1]])
    # valid: (0,1) 2==2 yes, (0,2) 3!=0 no, (0,3) 4==4 yes, (1,2) 2==2 yes -> 3 of 4
    assert token_accuracy_counts(logits, y) == (3, 4)
    assert token_accuracy(logits, y) == 0.75
    assert token_accuracy(logits, torch.full((2, 4), -1)) == 0.0


def test_generate_answers_equals_each_prompt_decoded_alone(tmp_path):
    from conftest import randomize
    from test_model import _tiny

    from generation import generate
    from model import GPT

    folder = _hf_tokenizer_folder(tmp_path / "tok")
    m = GPT(_tiny("tiny_llama3", vocab_size=16)).eval()
    randomize(m, seed=2)
    examples = [{"prompt": p, "response": "", "answer": "3"} for p in
                ["what is 1 + 2 ?", "Question : what is 2 + 2 + 1 ?\nAnswer :", "1 + 1", "2 ?"]]
    got = generate_answers(m, examples, folder, max_new_tokens=6, batch_size=3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for ex, text in zip(examples, got):
        ids = tok(ex["prompt"])["input_ids"]  # with the BOS, as in training
        alone = generate(m, torch.tensor([ids]), 6, temperature=0, eos_id=tok.eos_token_id, use_cache=False)[0, len(ids):]
        alone = alone.tolist()
        if tok.eos_token_id in alone:
            alone = alone[: alone.index(tok.eos_token_id)]
        assert text == tok.decode(alone, skip_special_tokens=True)
