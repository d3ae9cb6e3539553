"""
Supervised fine-tuning data: (prompt, response) examples in, padded (x, y) int64 batches out.

Sources: GSM8K (`question`, `answer` ending in `#### N`) and MetaMathQA (`query`, `response` ending in
`The answer is: N`) from the Hugging Face hub, or local .json/.jsonl/.parquet files with those fields
or with fields the caller names. Each example becomes {"prompt", "response", "answer"}, the prompt
rendered with a named template (TEMPLATES) so the run's config can record it.

Tokenization: prompt and response are encoded separately and concatenated, so the boundary is exact;
EOS ends the response so the model learns to stop; the tokenizer's BOS policy applies to the prompt.
Labels are -1 on prompt tokens, so the loss covers response tokens only. max_length bounds the whole
example (prompt + response + EOS); longer ones lose the end of their response.

Batching: length-bucketed padding, not packing. Each padded row is one example with targets -1 on its
padding, so the loss and the attention are exactly those of the example alone, with no attention
mask (padding is on the right, after every real token, under a causal mask). Packing several
examples into one row would waste no compute on padding but lets an example attend to the previous
one unless attention gets per-document masking, which our SDPA/flash path does not have; with GSM8K-
length examples, sorting each global batch by length removes most of the padding anyway.

Sampling, as token_loader.TokenLoader (same interface, same keyed bijection):
- epoch e visits the N examples in the order permute(., N, seed, e), a Feistel bijection keyed by
  (seed, epoch); steps_per_epoch = N // G with G = batch_size * grad_accum * world_size examples per
  optimizer step (the last N mod G examples of an epoch's order are skipped, so every step has G);
- the G examples of a step are sorted by length (then by index), and micro-step m of rank r takes
  the batch_size examples starting at (m * world_size + r) * batch_size. Which examples a step sees
  depends on seed and G only: 1 rank x 4 micro-steps and 2 ranks x 2 see the same G examples. Their
  micro-batches differ; loop.forward_backward weighs each by its number of targets, (y != -1).sum(),
  over the step's total, so the loss is independent of the split too;
- the state is one counter (micro-steps taken): state_dict()/load_state_dict() resume mid-epoch exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import loop
from finetune.answers import extract_marked
from token_loader import DataError, permute

TEMPLATE_FILE = "prompt_template.json"  # {"template": name}, beside every adapter this backend writes
# Prompt templates; {prompt} is the question. Each ends in a newline so that the response's first
# token starts a line in every tokenizer (no BPE merge across the prompt/response boundary).
TEMPLATES = {
    "qa": "Question: {prompt}\nAnswer:\n",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"),
    "plain": "{prompt}\n",
}


def render_prompt(text: str, template: str) -> str:
    """text as training shows it to the model: stripped, in the TEMPLATES[template] frame."""
    return TEMPLATES[template].format(prompt=text.strip())


# Per dataset: the hub id, its fields (prompt, response), its answer marker and its default template.
DATASETS = {
    "gsm8k": {"hub": ("openai/gsm8k", "main"), "fields": ("question", "answer"), "format": "gsm8k",
              "template": "qa"},
    "metamathqa": {"hub": ("meta-math/MetaMathQA", None), "fields": ("query", "response"),
                   "format": "metamathqa", "template": "alpaca"},
}
LOCAL_EXTENSIONS = (".json", ".jsonl", ".parquet")


def _read_local(path: str) -> list[dict]:
    """Rows of a .json (a list of objects), .jsonl or .parquet file."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} not found; write one with finetune/data/make_math.py or name "
                        f"gsm8k / metamathqa")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        with open(path) as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            rows = json.load(f)
    except Exception as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON list of objects, one per example")
    return rows


def _read_hub(source: str, split: str) -> list[dict]:
    """Rows of the hub dataset (needs internet or the HF datasets cache); never called in tests."""
    from datasets import load_dataset

    repo, name = DATASETS[source]["hub"]
    if source == "metamathqa" and split != "train":
        raise DataError("MetaMathQA has only a train split; evaluate on gsm8k's test split")
    try:
        return load_dataset(repo, name, split=split).to_list()
    except Exception as e:  # offline, unknown split, or a broken cache: one line, not the hub's traceback
        raise DataError(f"cannot load {repo} ({split}) from the Hugging Face hub: {str(e).splitlines()[0]}; "
                        f"connect once to fill the cache, or pass a local .jsonl/.parquet file") from None


def _fields_of(rows: list[dict], fields: dict | None, where: str) -> tuple[str, str, str | None]:
    """(prompt field, response field, answer format) from the caller's names or the rows' keys."""
    if fields:
        unknown = set(fields) - {"prompt", "response", "answer"}
        if unknown or "prompt" not in fields or "response" not in fields:
            raise DataError(f"fields must map 'prompt' and 'response' (and optionally 'answer') to column names; "
                            f"got {fields}")
        return fields["prompt"], fields["response"], None
    keys = set(rows[0])
    for spec in DATASETS.values():
        if set(spec["fields"]) <= keys:
            return (*spec["fields"], spec["format"])
    raise DataError(f"{where} has columns {sorted(keys)}, neither GSM8K's (question, answer) nor MetaMathQA's "
                    f"(query, response); name yours with fields={{'prompt': ..., 'response': ...}}")


def template_of(prompt: str) -> str:
    """The name of the TEMPLATES entry that rendered a prompt ('none' when none did)."""
    for name, text in TEMPLATES.items():
        before, after = text.split("{prompt}")
        if prompt.startswith(before) and prompt.endswith(after):
            return name
    return "none"


def load_examples(source: str, split: str = "train", *, fields: dict | None = None, limit: int | None = None,
                  template: str | None = None) -> list[dict]:
    """Examples {"prompt", "response", "answer"} from "gsm8k", "metamathqa" (hub) or a local file.

    template: a TEMPLATES name (default: the dataset's, "qa" for local files with other fields).
    answer: the marked final answer of the response (None when it has no marker and fields has no 'answer').
    """
    if source in DATASETS:
        rows, where = _read_hub(source, split), f"{source} ({split})"
    elif source.endswith(LOCAL_EXTENSIONS):
        rows, where = _read_local(source), source
    else:
        raise DataError(f"unknown data source {source!r}; use gsm8k, metamathqa or a "
                        f"{'/'.join(LOCAL_EXTENSIONS)} file")
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{where} has no examples")
    p_field, r_field, fmt = _fields_of(rows, fields, where)
    default = DATASETS[source]["template"] if source in DATASETS else next(
        (s["template"] for s in DATASETS.values() if s["format"] == fmt), "qa")
    name = template or default
    if name not in TEMPLATES:
        raise DataError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}")
    a_field = (fields or {}).get("answer")
    out = []
    for i, row in enumerate(rows):
        if p_field not in row or r_field not in row:
            raise DataError(f"{where} example {i} lacks the field {p_field!r} or {r_field!r}")
        response = str(row[r_field])
        answer = str(row[a_field]) if a_field else extract_marked(response, fmt)
        out.append({"prompt": render_prompt(str(row[p_field]), name), "response": response,
                    "answer": answer})
    return out


# ----------------------------------------------------------------------------------------------
# tokenization


class Encoder:
    """One interface over a transformers tokenizer and ours (tokenizer.Tokenizer): prompt ids with the
    tokenizer's BOS policy, plain ids, and the EOS id."""

    def __init__(self, tokenizer) -> None:
        if isinstance(tokenizer, str):
            if not os.path.isdir(tokenizer):
                raise DataError(f"tokenizer folder {tokenizer} not found; pass a Hugging Face tokenizer folder or "
                                f"a tokenizer.Tokenizer")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tok = tokenizer
        self.hf = hasattr(tokenizer, "convert_tokens_to_ids")
        if self.hf:
            self.eos_id = tokenizer.eos_token_id
            # The HF tokenizer's own choice of BOS (Llama adds one, Qwen and SmolLM2 do not).
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            bos = tokenizer.bos_token_id
            self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        else:
            self.eos_id = tokenizer.eos_id
            self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        if self.eos_id is None:
            raise DataError(f"tokenizer {tokenizer!r} has no EOS token; the response needs one to teach stopping")

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.hf:
            return self.tok(texts, add_special_tokens=False)["input_ids"]
        return self.tok.encode_batch(texts)

    def decode(self, ids: list[int]) -> str:
        if self.hf:
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)


def tokenize_examples(examples: Sequence[dict], tokenizer, max_length: int,
                      progress: bool = False) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example: BOS? + prompt + response + EOS, labels -1 on the prompt.

    tokenizer: a Hugging Face tokenizer folder (AutoTokenizer), a transformers tokenizer, or ours.
    Sequences longer than max_length lose the end of the response; an example whose prompt leaves no
    response token is dropped (with a warning saying how many). progress: a bar over batches of 1,024.
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length} must be >= 2 (a prompt token and a response token)")
    enc = Encoder(tokenizer)
    prompts, responses = [], []
    for start in loop.progress(range(0, len(examples), 1024), "tokenizing", -(-len(examples) // 1024), progress):
        batch = examples[start:start + 1024]
        prompts += enc.encode([e["prompt"] for e in batch])
        responses += enc.encode([e["response"] for e in batch])
    out, dropped = [], 0
    for p, r in zip(prompts, responses):
        p = enc.bos + list(p)
        ids = (p + list(r) + [enc.eos_id])[:max_length]
        if len(ids) <= len(p):
            dropped += 1
            continue
        out.append((ids, [-1] * len(p) + ids[len(p):]))
    if dropped:
        warnings.warn(f"{dropped} of {len(examples)} examples have a prompt of max_length={max_length} tokens or "
                      f"more and were dropped; raise max_length", stacklevel=2)
    return out


def _pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded, shifted (x, y) int64 (B, T): x = ids[:-1], y = labels[1:], y = -1 on padding."""
    T = max(len(ids) for ids, _ in rows) - 1
    T = -(-T // multiple) * multiple
    x = torch.full((len(rows), T), pad_id, dtype=torch.int64)
    y = torch.full((len(rows), T), -1, dtype=torch.int64)
    for i, (ids, labels) in enumerate(rows):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1], dtype=torch.int64)
        y[i, :n] = torch.tensor(labels[1:], dtype=torch.int64)
    return x, y


def _fingerprint(data: Sequence[tuple[list[int], list[int]]]) -> str:
    """A short hash of the examples' token and label lengths: catches a resume on other data."""
    lens = np.array([(len(ids), sum(t != -1 for t in labels)) for ids, labels in data], dtype=np.int64)
    return hashlib.sha256(lens.tobytes()).hexdigest()[:16]


class SFTLoader:
    """Training batches of tokenized examples for one rank; see the module docstring for the scheme.

    batch_size: examples per rank per micro-step; grad_accum: micro-steps per optimizer step.
    next_batch() -> (x, y) int64 (batch_size, T) with T the micro-batch's longest example minus one,
    rounded up to pad_multiple (a few distinct shapes keep torch.compile from recompiling often).
    """

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, device: str | torch.device = "cpu",
                 pad_id: int = 0, pad_multiple: int = 8) -> None:
        if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size or pad_multiple < 1:
            raise DataError(f"need batch_size >= 1, grad_accum >= 1, pad_multiple >= 1 and 0 <= rank < world_size; "
                            f"got {batch_size}, {grad_accum}, {pad_multiple}, rank {rank} of {world_size}")
        self.examples = list(examples)
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size
        self.seed, self.pad_id, self.pad_multiple = seed, pad_id, pad_multiple
        self.device = torch.device(device)
        self.global_batch_size = G = batch_size * grad_accum * world_size
        self.steps_per_epoch = len(self.examples) // G
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.examples)} examples do not fill one global batch of {G} "
                            f"(batch_size x grad_accum x world_size); use more data or a smaller batch")
        self.lengths = np.array([len(ids) for ids, _ in self.examples], dtype=np.int64)
        self.fingerprint = _fingerprint(self.examples)
        self.micro_step = 0  # micro-steps this rank has taken

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self.micro_step // self.grad_accum // self.steps_per_epoch

    def indices(self, k: int) -> np.ndarray:
        """Example indices of this rank's micro-step k (batch_size,)."""
        step, micro = divmod(k, self.grad_accum)
        epoch, s = divmod(step, self.steps_per_epoch)
        G = self.global_batch_size
        idx = permute(np.arange(s * G, (s + 1) * G, dtype=np.int64), len(self.examples), self.seed, epoch)
        idx = idx[np.lexsort((idx, self.lengths[idx]))]  # by length, ties by index: same on every rank
        start = (micro * self.world_size + self.rank) * self.batch_size
        return idx[start:start + self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (batch_size, T) on device for this rank's next micro-step; y = -1 off the response."""
        x, y = _pad([self.examples[i] for i in self.indices(self.micro_step)], self.pad_id, self.pad_multiple)
        self.micro_step += 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """Where the stream is: enough to continue it exactly after a restart."""
        step, micro = divmod(self.micro_step, self.grad_accum)
        return {"version": 1, "kind": "sft", "seed": self.seed, "n_examples": len(self.examples),
                "fingerprint": self.fingerprint, "global_batch_size": self.global_batch_size, "step": step,
                "micro_step": micro, "split": (self.batch_size, self.grad_accum, self.world_size)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the stream saved by state_dict(), possibly on another world size with the same G."""
        mine = self.state_dict()
        for key in ("version", "kind", "seed", "n_examples", "fingerprint", "global_batch_size"):
            if sd.get(key) != mine[key]:
                raise DataError(f"loader state has {key}={sd.get(key)} but this run has {mine[key]}; the stream "
                                f"would differ, so resume with the same data, seed and global batch")
        if sd["micro_step"] and tuple(sd["split"]) != mine["split"]:
            raise DataError("loader state is mid-step, so it needs the same batch_size, grad_accum and world_size")
        self.micro_step = sd["step"] * self.grad_accum + sd["micro_step"]


def eval_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", pad_id: int = 0,
                 n_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of padded (x, y) batches in data order; batch k belongs to rank k % world_size.

    n_batches: the first n_batches global batches only (None: all examples). Sum targets and losses
    across ranks to get the mean over the whole set.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, rank {rank} of "
                        f"{world_size}")
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    if n_batches is not None:
        chunks = chunks[:n_batches]
    dev = torch.device(device)
    return [tuple(t.to(dev) for t in _pad(c, pad_id, 1)) for c in chunks[rank::world_size]]
