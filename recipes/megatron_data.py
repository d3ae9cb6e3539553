"""
Our token shards as Megatron-LM indexed datasets, with no re-tokenizing.

A shard <split>[_NNNNNN].bin is already a Megatron .bin (raw little-endian token ids). Megatron
also needs <prefix>.idx, which this module writes beside it:

    magic b"MMIDIDX\\x00\\x00", uint64 version 1, uint8 dtype code, uint64 S, uint64 S + 1,
    int32[S] sequence lengths, int64[S] byte offsets, int64[S + 1] document indices.

Each sequence is one document, cut after every EOS id (our encoder emits EOS only at a document's
end); tokens after a shard's last EOS (a document continued in the next shard) are one more
sequence. dtype codes: 8 = uint16, 4 = int32. Megatron has no uint32: our uint32 ids are all below
2**31 (the largest vocabulary is 151,936), so the same bytes read exactly as int32.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from token_loader import DataError, read_meta, resolve_data_dir

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {"uint16": 8, "uint32": 4}  # uint32 ids are written as Megatron's int32 (code 4)
READ_DTYPES = {8: np.uint16, 4: np.int32}


def document_lengths(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Lengths of the sequences of one shard: cut after each EOS; a trailing remainder is one more."""
    if eos_id is None:
        return np.array([len(tokens)] if len(tokens) else [], dtype=np.int64)
    ends = np.flatnonzero(tokens == eos_id) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens)) if len(tokens) else ends
    return np.diff(np.concatenate([[0], ends])).astype(np.int64)


def index_bytes(lengths: np.ndarray, itemsize: int, dtype_code: int) -> bytes:
    """The .idx file for sequences of the given lengths (in tokens), one document each."""
    S = len(lengths)
    if S and int(lengths.max()) >= 2**31:
        raise DataError(f"a document of {int(lengths.max())} tokens does not fit Megatron's int32 lengths")
    pointers = np.zeros(S, dtype=np.int64)
    if S:
        pointers[1:] = np.cumsum(lengths[:-1] * itemsize)
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code) + struct.pack("<QQ", S, S + 1)
    return (header + lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
            + np.arange(S + 1, dtype="<i8").tobytes())


def read_index(path: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype code, lengths, byte pointers, document indices) of a .idx file; checks the header."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:9] != MAGIC or struct.unpack_from("<Q", raw, 9)[0] != VERSION:
        raise DataError(f"{path} is not a Megatron MMIDIDX version 1 index")
    code = raw[17]
    S, D = struct.unpack_from("<QQ", raw, 18)
    o = 34
    lengths = np.frombuffer(raw, "<i4", S, o)
    pointers = np.frombuffer(raw, "<i8", S, o + 4 * S)
    docs = np.frombuffer(raw, "<i8", D, o + 12 * S)
    return code, lengths, pointers, docs


def read_documents(prefix: str) -> list[np.ndarray]:
    """Every document of <prefix>.bin as read through <prefix>.idx (a reader independent of Megatron)."""
    code, lengths, pointers, docs = read_index(prefix + ".idx")
    data = np.memmap(prefix + ".bin", dtype=READ_DTYPES[code], mode="r")
    itemsize = data.dtype.itemsize
    seqs = [np.asarray(data[p // itemsize:p // itemsize + n]) for p, n in zip(pointers.tolist(), lengths.tolist())]
    return [np.concatenate(seqs[a:b]) if b > a else np.zeros(0, data.dtype) for a, b in zip(docs[:-1], docs[1:])]


def convert(data_dir: str) -> dict[str, list[tuple[int, str]]]:
    """Write an .idx beside every shard of a prepared dataset; returns split -> [(tokens, prefix)]."""
    data_dir = os.path.abspath(resolve_data_dir(data_dir))  # the script runs from a Megatron-LM checkout
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    if meta["dtype"] == "uint32" and meta["vocab_size"] > 2**31:
        raise DataError(f"{data_dir}: vocab_size {meta['vocab_size']} does not fit Megatron's int32 tokens")
    out: dict[str, list[tuple[int, str]]] = {}
    for split, info in meta["splits"].items():
        out[split] = []
        for shard in info["shards"]:
            path = os.path.join(data_dir, shard["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != shard["tokens"] * dtype.itemsize:
                raise DataError(f"shard {path} is missing or not {shard['tokens']} {dtype.name} tokens as meta.json "
                                f"says; re-run the dataset's prepare.py")
            if shard["tokens"] == 0:
                continue  # an empty split: Megatron cannot take an empty prefix
            lengths = document_lengths(np.memmap(path, dtype=dtype, mode="r"), meta.get("eos_id"))
            prefix = path[:-len(".bin")]
            tmp = prefix + ".idx.tmp"
            with open(tmp, "wb") as f:
                f.write(index_bytes(lengths, dtype.itemsize, DTYPE_CODES[meta["dtype"]]))
            os.replace(tmp, prefix + ".idx")
            out[split].append((shard["tokens"], prefix))
    return out


def data_path_args(prefixes: dict[str, list[tuple[int, str]]]) -> list[str]:
    """--train-data-path / --valid-data-path arguments: 'weight prefix' pairs, weights = token counts."""
    args = []
    for split, flag in (("train", "--train-data-path"), ("val", "--valid-data-path")):
        if prefixes.get(split):
            args.append(flag + " " + " ".join(f"{n} {p}" for n, p in prefixes[split]))
    return args
