"""
Downstream task evaluation: zero-shot accuracy on multiple-choice and cloze tasks, scored the way
lm-evaluation-harness scores them, plus a CORE-style centered aggregate (DCLM).

    results = evals.evaluate(model, encoder, evals.load_tasks(["hellaswag", "my_task.jsonl"]))

Three forms, each reduced to (context, continuation) requests scored by the summed log-probability
of the continuation's tokens given the context:
- choice: one context, one continuation per choice (HellaSwag, ARC, PIQA). acc picks the highest
  log-likelihood; acc_norm divides it by the choice's length in characters first (lm-eval's acc_norm).
- schema: one context per choice, one fixed continuation (Winogrande): the choice whose context
  makes the continuation likeliest.
- cloze: one context, one continuation; correct when greedy decoding gives every continuation
  token (LAMBADA's acc, lm-eval's is_greedy).
Tokenization is lm-eval's: trailing whitespace of the context moves to the continuation, the pair is
encoded whole and the continuation is what follows the separately encoded context; an input longer
than the model's block_size keeps its last block_size + 1 tokens (left truncation).

Scoring packs each example into one row: the tokens its requests share (the context, for a choice
task) once, then each request's own tokens, under a mask where a request's tokens see the shared
part and themselves only (positions continue from the shared part). The model runs such rows through
its KV-cache seam (model.DecodeCache: positions and mask come from the cache object), so a question's
context is computed once for all its choices; rows are batched by length. Only the continuation
positions go through the output head.

Tasks: TASKS names the published ones (read with `datasets` from the hub, or the same fields from a
local JSONL file: NAME=PATH.jsonl); PATH.jsonl alone is a task in our own fields (see load_task).
Under torchrun each rank scores every world_size-th example and the counts are summed once.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from errors import UserError
from model import GPT


class TaskError(UserError):
    """An unknown task, a task file that cannot be read or lacks fields, a model without a tokenizer."""


# -----------------------------------------------------------------------------
# Task data


@dataclass
class Example:
    """One question: (context, continuation) requests, the right one, and what acc_norm divides by."""

    requests: list[tuple[str, str]]
    gold: int  # index of the right request (cloze: 0)
    choice_lengths: list[int]  # characters of each choice as the task states it (lm-eval's acc_norm)
    ids: list[tuple[list[int], list[int]]] | None = None  # per request (context, continuation) ids: tokenize()


@dataclass
class Task:
    name: str
    kind: str  # "choice", "schema" or "cloze"
    examples: list[Example]
    random_baseline: float  # accuracy of a random guess, subtracted in the centered score (DCLM)
    core_metric: str  # "acc" or "acc_norm": the accuracy the centered score uses


def _hellaswag_clean(text: str) -> str:
    # lm-eval's hellaswag preprocess: WikiHow's bracketed artifacts out, double spaces collapsed
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Example:
    return Example([(context, delimiter + c) for c in choices], gold, [len(c) for c in choices])


def _hellaswag(doc: dict) -> Example:
    query = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _choice(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _arc(doc: dict) -> Example:
    choices = doc["choices"]
    return _choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                   list(choices["label"]).index(doc["answerKey"]))


def _piqa(doc: dict) -> Example:
    return _choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> Example:
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]
    continuation = " " + doc["sentence"][blank + 1:].strip()
    return Example([(c, continuation) for c in contexts], {"1": 0, "2": 1}[str(doc["answer"])],
                   [len(c) for c in contexts])


def _lambada(doc: dict) -> Example:
    words = doc["text"].split(" ")
    return Example([(" ".join(words[:-1]), " " + words[-1])], 0, [len(words[-1]) + 1])


def _generic_choice(doc: dict) -> Example:
    return _choice(doc["context"], list(doc["choices"]), int(doc["label"]), delimiter="")


def _generic_schema(doc: dict) -> Example:
    contexts = list(doc["contexts"])
    return Example([(c, doc["continuation"]) for c in contexts], int(doc["label"]), [len(c) for c in contexts])


def _generic_cloze(doc: dict) -> Example:
    return Example([(doc["context"], doc["continuation"])], 0, [len(doc["continuation"])])


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    fields: tuple[str, ...]  # the published fields an example needs
    to_example: Callable[[dict], Example]
    random_baseline: float | None  # None: 1 / choices, averaged over the examples
    core_metric: str
    hub: tuple[str, str | None, str] | None = None  # (dataset path, config name, split), as lm-eval reads it
    local: str | None = None  # a prepared file, relative to the repository root (offline tasks)


HERE = os.path.dirname(os.path.abspath(__file__))

TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("choice", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag, 0.25,
                          "acc_norm", hub=("Rowan/hellaswag", None, "validation")),
    "arc_easy": TaskSpec("choice", ("question", "choices", "answerKey"), _arc, 0.25, "acc_norm",
                         hub=("allenai/ai2_arc", "ARC-Easy", "test")),
    "arc_challenge": TaskSpec("choice", ("question", "choices", "answerKey"), _arc, 0.25, "acc_norm",
                              hub=("allenai/ai2_arc", "ARC-Challenge", "test")),
    "piqa": TaskSpec("choice", ("goal", "sol1", "sol2", "label"), _piqa, 0.5, "acc_norm",
                     hub=("baber/piqa", None, "validation")),
    "winogrande": TaskSpec("schema", ("sentence", "option1", "option2", "answer"), _winogrande, 0.5, "acc",
                           hub=("allenai/winogrande", "winogrande_xl", "validation")),
    "lambada_openai": TaskSpec("cloze", ("text",), _lambada, 0.0, "acc",
                               hub=("EleutherAI/lambada_openai", "default", "test")),
    # built offline from the quickstart's held-out split by data/shakespeare_char/prepare.py
    "shakespeare_line_end": TaskSpec("choice", ("context", "choices", "label"), _generic_choice, None, "acc_norm",
                                      local="data/shakespeare_char/line_end.jsonl"),
}

# Our own JSONL fields, told apart by the field that only one form has.
GENERIC = {
    "choices": TaskSpec("choice", ("context", "choices", "label"), _generic_choice, None, "acc_norm"),
    "contexts": TaskSpec("schema", ("contexts", "continuation", "label"), _generic_schema, None, "acc"),
    "continuation": TaskSpec("cloze", ("context", "continuation"), _generic_cloze, 0.0, "acc"),
}


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """The records of a JSONL file (the first `limit`), or a TaskError naming the bad line."""
    if not os.path.isfile(path):
        raise TaskError(f"task file {path} not found")
    docs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path} line {n} is not JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(doc, dict):
                raise TaskError(f"{path} line {n} is not a JSON object")
            docs.append(doc)
    if not docs:
        raise TaskError(f"{path} holds no examples")
    return docs


def hub_docs(name: str, spec: TaskSpec, limit: int | None) -> list[dict]:
    """The published split of a task through `datasets` (downloaded once, then cached)."""
    path, config, split = spec.hub
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # no network, no datasets, a renamed dataset: one line, with the offline route
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TaskError(f"task {name}: loading {path} from the Hugging Face hub failed ({msg}); offline, pass "
                        f"its fields as a local file: --tasks={name}=PATH.jsonl") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]


def to_examples(name: str, spec: TaskSpec, docs: list[dict], where: str) -> list[Example]:
    """Examples from records holding spec's fields; a TaskError names the first missing field."""
    out = []
    for n, doc in enumerate(docs, 1):
        missing = [f for f in spec.fields if f not in doc]
        if missing:
            raise TaskError(f"task {name}: record {n} of {where} has no field {missing[0]!r}; a {spec.kind} "
                            f"example needs {', '.join(spec.fields)}")
        try:
            ex = spec.to_example(doc)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise TaskError(f"task {name}: record {n} of {where} is malformed ({type(e).__name__}: {e})") from None
        if not 0 <= ex.gold < len(ex.requests):
            raise TaskError(f"task {name}: record {n} of {where} has label {ex.gold} for {len(ex.requests)} choices")
        out.append(ex)
    return out


def load_task(spec_str: str, max_examples: int | None = None) -> Task:
    """A task from NAME (TASKS: the hub, or its prepared local file), NAME=PATH.jsonl (the published fields
    from a local file) or PATH.jsonl (our fields: context/choices/label, contexts/continuation/label, or
    context/continuation), its first max_examples examples."""
    name, _, path = spec_str.partition("=")
    if not path and name.endswith(".jsonl"):
        path = name
        docs = read_jsonl(path, max_examples)
        form = next((k for k in GENERIC if k in docs[0]), None)
        if form is None:
            raise TaskError(f"{path}: cannot tell the task's form: a record needs 'choices' (multiple choice), "
                            f"'contexts' (schema) or 'continuation' (cloze)")
        spec, name = GENERIC[form], os.path.splitext(os.path.basename(path))[0]
    else:
        if name not in TASKS:
            close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise TaskError(f"unknown task {name!r}; {hint}known tasks: {', '.join(TASKS)}, or a PATH.jsonl")
        spec = TASKS[name]
        if not path and spec.local is not None:
            path = os.path.join(HERE, spec.local)
            if not os.path.isfile(path):
                raise TaskError(f"task {name}: {spec.local} not found; run: python {os.path.dirname(spec.local)}/prepare.py")
        docs = read_jsonl(path, max_examples) if path else hub_docs(name, spec, max_examples)
    examples = to_examples(name, spec, docs, path or "the hub split")
    baseline = spec.random_baseline
    if baseline is None:
        baseline = sum(1 / len(ex.requests) for ex in examples) / len(examples)
    return Task(name, spec.kind, examples, baseline, spec.core_metric)


def load_tasks(specs: list[str], max_examples: int | None = None) -> list[Task]:
    tasks = [load_task(s, max_examples) for s in specs]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"a task is named twice in {', '.join(specs)}")
    return tasks


def parse_task_list(value: str) -> list[str]:
    """'hellaswag,my.jsonl' -> ['hellaswag', 'my.jsonl']."""
    return [s.strip() for s in value.split(",") if s.strip()]


# -----------------------------------------------------------------------------
# Tokens


@dataclass
class Encoder:
    """Text to the ids the model reads: encode(text) adds the model's BOS where it has one;
    prefix_id stands in for an empty context (lm-eval: BOS, else EOS); decode(ids) is the text."""

    encode: Callable[[str], list[int]]
    prefix_id: int | None
    decode: Callable[[list[int]], str]


def encoder_from_tokenizer(tok) -> Encoder:
    """An Encoder over tokenizer.Tokenizer with its family's BOS policy (LLaMA: BOS; GPT-2, Qwen, char: none)."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    return Encoder(lambda text: bos + tok.encode(text), tok.bos_id if tok.bos_id is not None else tok.eos_id,
                   tok.decode)


def encoder_from_hf_folder(folder: str) -> Encoder:
    """An Encoder over a Hugging Face folder's tokenizer.json with its own special-token policy, as
    transformers' tokenizer(text) applies it (so as lm-eval's hf model tokenizes)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise TaskError(f"{folder} has no tokenizer.json; copy the tokenizer files of the model into it "
                        f"(export_hf.py writes none), or pass --tokenizer=FOLDER")
    from tokenizers import Tokenizer as RustTokenizer

    tok = RustTokenizer.from_file(path)
    special = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            special = json.load(f)

    def token_id(key: str) -> int | None:
        value = special.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if isinstance(value, str) else None

    bos, eos = token_id("bos_token"), token_id("eos_token")
    return Encoder(lambda text: tok.encode(text, add_special_tokens=True).ids, bos if bos is not None else eos,
                   lambda ids: tok.decode(ids, skip_special_tokens=True))


def encode_pair(enc: Encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval forms them for a causal model."""
    if context == "":
        cont = enc.encode(continuation)
        if enc.prefix_id is None:
            raise TaskError("an example has an empty context and the tokenizer has no BOS or EOS to stand in")
        return ([enc.prefix_id], cont) if cont[0] != enc.prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:  # trailing whitespace belongs to the continuation's first token
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = enc.encode(context + continuation), enc.encode(context)
    return ctx, whole[len(ctx):]


def load_model(path: str, tokenizer: str | None = None) -> tuple[GPT, Encoder, str]:
    """(raw model on CPU in float32, its Encoder, what it is) from a train.py out_dir or checkpoint folder
    (the tokenizer its dataset's meta.json names) or a Hugging Face folder (its tokenizer.json).
    tokenizer: a Hugging Face folder whose tokenizer.json to use instead."""
    import checkpoint

    if not os.path.isdir(path):
        raise TaskError(f"{path} is not a folder; pass a train.py out_dir, its ckpt/ folder or a Hugging Face folder")
    if os.path.isfile(os.path.join(path, "config.json")):
        import hf_checkpoint

        model = hf_checkpoint.from_hf(path, dtype=torch.float32)
        return model, encoder_from_hf_folder(tokenizer or path), f"Hugging Face folder {path}"
    ckpt = path if os.path.isfile(os.path.join(path, "state.json")) else None
    if ckpt is None:
        ckpt, state = checkpoint.latest(path)
    else:
        state = checkpoint.read_state(ckpt)
    model = checkpoint.load_model(ckpt)
    if tokenizer is not None:
        return model, encoder_from_hf_folder(tokenizer), f"checkpoint {ckpt} (iter {state.get('iter_num')})"
    from tokenizer import TokenizerError, tokenizer_from_meta

    data = state.get("dataset") or {}
    if "meta" not in data:
        raise TaskError(f"checkpoint {ckpt} does not record its dataset's tokenizer; pass --tokenizer=FOLDER "
                        f"(a Hugging Face folder with the tokenizer.json it was trained with)")
    try:
        tok = tokenizer_from_meta(data["meta"], data.get("path", "?"))
    except TokenizerError as e:
        raise TaskError(f"the tokenizer of checkpoint {ckpt} cannot be found: {e}; or pass --tokenizer=FOLDER") from None
    return model, encoder_from_tokenizer(tok), f"checkpoint {ckpt} (iter {state.get('iter_num')})"


def tokenize(tasks: list[Task], enc: Encoder, max_length: int) -> None:
    """Encode every request once (Example.ids), checked against the model's context: a TaskError for a
    continuation that is empty or longer than max_length tokens, before any scoring."""
    for task in tasks:
        for n, ex in enumerate(task.examples, 1):
            if ex.ids is not None:
                continue
            ex.ids = [encode_pair(enc, c, x) for c, x in ex.requests]
            for _, cont in ex.ids:
                if not cont or len(cont) > max_length:
                    raise TaskError(f"task {task.name}: example {n} has a continuation of {len(cont)} tokens; the "
                                    f"model scores 1 to {max_length} (its block_size)")


# -----------------------------------------------------------------------------
# Scoring


@dataclass
class Row:
    """One packed sequence: a shared prefix, then each request's own tokens."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)  # 0: shared prefix; i + 1: request i's own tokens
    # per request: (request index, row indices whose logits predict its continuation, the continuation ids)
    targets: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def pack(inputs: list[tuple[list[int], list[int]]], max_length: int, row_limit: int | None) -> list[Row]:
    """Rows for one example's requests, given as (context ids, continuation ids).

    Each request's input is lm-eval's: (context + continuation)[-(max_length + 1):][:-1]. The longest
    prefix all inputs share is computed once per row; row_limit caps a row's length (learned positions:
    a row may not exceed block_size), splitting the requests over several rows when needed."""
    seqs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in inputs]  # tokenize() checked 1 <= cont <= max
    shared = 0
    shortest = min(len(s) for s in seqs)
    while shared < shortest and all(s[shared] == seqs[0][shared] for s in seqs):
        shared += 1
    prefix = seqs[0][:shared]
    rows: list[Row] = []
    for i, (seq, (_, cont)) in enumerate(zip(seqs, inputs)):
        own = seq[shared:]
        if not rows or (row_limit is not None and len(rows[-1].tokens) + len(own) > row_limit):
            rows.append(Row(list(prefix), list(range(shared)), [0] * shared))
        row = rows[-1]
        start = len(row.tokens)
        row.tokens += own
        row.positions += range(shared, len(seq))
        row.segment += [len(row.targets) + 1] * len(own)
        # logits at input index t predict token t + 1; the continuation fills the last len(cont) slots
        where = [t if t < shared else start + t - shared for t in range(len(seq) - len(cont), len(seq))]
        row.targets.append((i, where, cont))
    return rows


class _PackedRows:
    """Stands in for a KV cache (model.DecodeCache) holding nothing: it hands the model each token's
    position and the mask of what it may see (its own request and the shared prefix, causally)."""

    def __init__(self, positions: torch.Tensor, mask: torch.Tensor) -> None:
        self.positions, self.mask = positions, mask

    def extend(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions, self.mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


def batch_tensors(rows: list[Row], device: torch.device) -> tuple[torch.Tensor, _PackedRows]:
    """(idx (B, T), the packed mask's cache) of rows right-padded to the longest; a padding token sees
    itself only (a non-empty softmax whose output is never read)."""
    T = max(len(r.tokens) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.tokens)
        idx[b, :n], pos[b, :n], seg[b, :n] = torch.tensor(r.tokens), torch.tensor(r.positions), torch.tensor(r.segment)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): key j <= query i
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # (B, T, T): own request or prefix
    mask = (causal & same & (seg[:, :, None] >= 0)) | torch.eye(T, dtype=torch.bool)
    return idx.to(device), _PackedRows(pos.to(device), mask[:, None].to(device))


@torch.no_grad()
def score_rows(model: GPT, rows: list[Row], device: torch.device) -> list[list[tuple[float, bool]]]:
    """Per row, per target: (summed log-probability of the continuation, every token the argmax)."""
    idx, packed = batch_tensors(rows, device)
    rows_at = [b for b, r in enumerate(rows) for _, where, _ in r.targets for _ in where]
    cols_at = [t for r in rows for _, where, _ in r.targets for t in where]
    out = {}

    def head(module: torch.nn.Module, args: tuple, h: torch.Tensor) -> None:
        # The cached forward returns the last position's logits only; the last block's output h (B, T, C)
        # holds every position, and only the continuation positions go through the head. Inside the
        # forward, so that FSDP still holds the head's gathered weights.
        out["logits"] = model.head(h[rows_at, cols_at][None], None)[0][0]  # (N, V)

    handle = model.h[-1].register_forward_hook(head)
    try:
        model(idx, cache=packed)
    finally:
        handle.remove()
    logp = F.log_softmax(out["logits"].float(), dim=-1)  # (N, V)
    target = torch.tensor([t for r in rows for _, _, cont in r.targets for t in cont], device=logp.device)
    picked = logp.gather(1, target[:, None])[:, 0].cpu()
    greedy = (logp.argmax(-1) == target).cpu()
    result, n = [], 0
    for r in rows:
        per = []
        for _, where, _ in r.targets:
            per.append((picked[n:n + len(where)].sum().item(), bool(greedy[n:n + len(where)].all())))
            n += len(where)
        result.append(per)
    return result


def batches(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Rows grouped longest first, each group's padded size (rows x longest) within batch_tokens."""
    out: list[list[Row]] = []
    for r in sorted(rows, key=lambda r: -len(r.tokens)):
        if out and (len(out[-1]) + 1) * len(out[-1][0].tokens) <= batch_tokens:
            out[-1].append(r)
        else:
            out.append([r])
    return out


@dataclass
class Scored:
    """Per example, per request: the continuation's log-likelihood and whether greedy decoding gives it."""

    lls: list[list[float]]
    greedy: list[list[bool]]


def plan(model: GPT, examples: list[Example]) -> tuple[list[Row], list[int]]:
    """The packed rows of examples and, per row, the index of the example it scores."""
    max_length = model.config.block_size
    row_limit = max_length if model.wpe is not None else None  # learned positions: a row fits block_size
    rows, owner = [], []
    for e, ex in enumerate(examples):
        for row in pack(ex.ids, max_length, row_limit):
            rows.append(row)
            owner.append(e)
    return rows, owner


def loglikelihoods(model: GPT, enc: Encoder, task_examples: list[list[Example]], batch_tokens: int = 8192,
                   autocast: contextlib.AbstractContextManager | None = None, device: torch.device | None = None,
                   step: Callable[[], None] | None = None, n_batches: Callable[[int], int] | None = None
                   ) -> list[Scored]:
    """Score every request of each task's examples, batched over all tasks; step() runs before each batch
    (an interrupt check). n_batches(mine) -> how many batches to run (under torchrun the most of any
    rank, so that every rank calls the model as often: the extra batches are one token)."""
    device = device or next(model.parameters()).device
    tokenize([Task("", "", examples, 0.0, "acc") for examples in task_examples], enc, model.config.block_size)
    rows, owner = [], []
    for t, examples in enumerate(task_examples):
        r, o = plan(model, examples)
        rows += r
        owner += [(t, e) for e in o]
    where = {id(r): o for r, o in zip(rows, owner)}
    groups = batches(rows, batch_tokens)
    total = n_batches(len(groups)) if n_batches is not None else len(groups)
    dummy = [Row([0], [0], [1], [(0, [0], [0])])]
    out = [Scored([[0.0] * len(ex.requests) for ex in examples], [[False] * len(ex.requests) for ex in examples])
           for examples in task_examples]
    was_training = model.training
    model.eval()
    try:
        for k in range(total):
            if step is not None:
                step()
            group = groups[k] if k < len(groups) else dummy
            with autocast or contextlib.nullcontext():
                scores = score_rows(model, group, device)
            if k >= len(groups):
                continue
            for r, per in zip(group, scores):
                t, e = where[id(r)]
                for (i, _, _), (ll, greedy) in zip(r.targets, per):
                    out[t].lls[e][i], out[t].greedy[e][i] = ll, greedy
    finally:
        model.train(was_training)
    return out


def outcomes(task: Task, examples: list[Example], scored: Scored) -> list[tuple[float, float]]:
    """Per example: (acc, acc_norm) as lm-eval computes them (cloze: is_greedy for both)."""
    out = []
    for ex, lls, greedy in zip(examples, scored.lls, scored.greedy):
        if task.kind == "cloze":
            out.append((float(greedy[0]), float(greedy[0])))
            continue
        pred = max(range(len(lls)), key=lambda i: lls[i])  # the first of ties, as numpy's argmax
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / ex.choice_lengths[i])
        out.append((float(pred == ex.gold), float(pred_norm == ex.gold)))
    return out


def centered(accuracy: float, random_baseline: float) -> float:
    """DCLM's centered accuracy: 0 at chance, 1 at perfect."""
    return (accuracy - random_baseline) / (1 - random_baseline)


def evaluate(model: GPT, enc: Encoder, tasks: list[Task], *, batch_tokens: int = 8192,
             autocast: contextlib.AbstractContextManager | None = None,
             rank: int = 0, world_size: int = 1, device: torch.device | None = None,
             step: Callable[[], None] | None = None) -> dict:
    """{'tasks': {name: {acc, acc_norm, centered, n, random_baseline}}, 'core': mean centered, 'seconds'}.

    Rank r scores examples r, r + world_size, ...; the per-task counts are summed over ranks in one
    all-reduce. Every rank runs the same number of forward calls (FSDP's collectives need it): a rank
    with fewer batches repeats a one-token batch."""
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    mine = [task.examples[rank::world_size] for task in tasks]
    sums = torch.zeros(len(tasks), 3, dtype=torch.float64)  # acc, acc_norm, examples
    if world_size > 1:
        import torch.distributed as dist

        def most(n: int) -> int:
            t = torch.tensor([n], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return int(t.item())
    scored = loglikelihoods(model, enc, mine, batch_tokens, autocast, device, step,
                            most if world_size > 1 else None)
    for t, (task, examples) in enumerate(zip(tasks, mine)):
        for acc, acc_norm in outcomes(task, examples, scored[t]):
            sums[t] += torch.tensor([acc, acc_norm, 1.0], dtype=torch.float64)
    if world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)  # the one reduction of the results
        sums = sums.cpu()
    out = {}
    for task, (acc, acc_norm, n) in zip(tasks, sums.tolist()):
        acc, acc_norm = acc / max(n, 1), acc_norm / max(n, 1)
        score = acc_norm if task.core_metric == "acc_norm" else acc
        out[task.name] = {"acc": acc, "acc_norm": acc_norm, "centered": centered(score, task.random_baseline),
                          "n": int(n), "random_baseline": task.random_baseline, "core_metric": task.core_metric}
    core = sum(r["centered"] for r in out.values()) / len(out) if out else math.nan
    return {"tasks": out, "core": core, "seconds": time.perf_counter() - t0}


def summary(results: dict) -> str:
    """One line: each task's acc (and acc_norm for choice tasks), the CORE aggregate and the cost."""
    parts = []
    for name, r in results["tasks"].items():
        norm = f" acc_norm {r['acc_norm']:.4f}" if r["core_metric"] == "acc_norm" else ""
        parts.append(f"{name} acc {r['acc']:.4f}{norm} (n={r['n']}, chance {r['random_baseline']:.3f})")
    return f"{'; '.join(parts)}; CORE {results['core']:.4f} in {results['seconds']:.1f} s"
