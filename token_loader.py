"""
Token loader for training: memory-mapped shards in, (x, y) int64 batches of block_size out.

A prepared dataset (see dataprep.py and docs/DATA.md) is a folder with meta.json and one or more
shards per split (train.bin, or train_000000.bin, ...). meta.json is checked against the shards
before anything is read: dtype, token counts (so a truncated shard is caught), and the largest
token id against the model's vocab_size; every batch is checked again.

Sampling scheme: an epoch permutation through a keyed bijection.
- Each shard of n tokens is cut into (n - 1) // block_size windows of block_size + 1 tokens at a
  stride of block_size, so a window never crosses a shard boundary and every token is a target
  once per epoch (a shard's last < block_size + 1 tokens are not used). The W windows of the
  split are numbered 0..W-1 in shard order.
- The run reads an infinite stream of windows: the sequence at global position p is window
  perm_e(p mod W) of epoch e = p // W, where perm_e is a 4-round Feistel network over the
  smallest even bit width holding W, keyed by splitmix64(seed, e), with cycle walking to stay in
  [0, W). It is a bijection, so each epoch visits every window exactly once, in an order that
  changes every epoch, in O(1) memory (no permutation array: the 627B set has ~3e8 windows) and
  with random access, so each rank computes and reads only its own positions.
- Optimizer step s consumes positions [s*G, (s+1)*G), with G = batch_size * grad_accum *
  world_size. Micro-step m of rank r takes the B = batch_size positions starting at
  s*G + (m*world_size + r)*B. Which tokens a step sees is therefore a function of seed, G and
  block_size only: 1 rank x 4 micro-steps and 2 ranks x 2 micro-steps see the same G sequences.
  Uniform random offsets (nanoGPT) would also be O(1), but they repeat some windows and skip
  ~1/e of the data within an epoch's worth of steps, which matters for one-epoch pretraining.
- The state is one counter (micro-steps taken), so state_dict()/load_state_dict() resume the
  exact stream, even on another world size or micro-batch split with the same G (at a step
  boundary, where checkpoints are taken).

With use_dataloader=True, a torch DataLoader computes the same micro-batches (indexed by
micro-step) in worker processes, optionally into pinned memory; the batches are identical to the
in-process path. eval_batches() returns a fixed sequence of batches (its own key, epoch 0), read
lazily so that a large eval_iters costs one batch of memory, so val loss is comparable across
evaluations. check_sizes() refuses, before any work, batches larger than a split or than memory.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import numpy as np
import torch

from errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
FORMAT = "nanollm-tokens-v1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
EVAL_SEED = 0x5EED_E7A1  # key of the fixed evaluation windows, independent of the training seed
MASK64 = (1 << 64) - 1


class DataError(UserError):
    """A dataset problem; the one-line message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------
# the keyed bijection


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    # splitmix64's finalizer on uint64 arrays; numpy array arithmetic wraps mod 2**64 as intended.
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """perm(i) for i in [0, n): a bijection of [0, n) keyed by (seed, epoch), evaluated elementwise."""
    assert n > 0 and (i.size == 0 or (i.min() >= 0 and i.max() < n))
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # Feistel halves: 2*half bits hold every index < n
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(_splitmix64((_splitmix64(seed & MASK64) ^ _splitmix64(epoch)) + r)) for r in range(4)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    x = feistel(i.astype(np.uint64))
    out_of_range = x >= np.uint64(n)
    while out_of_range.any():  # cycle walking: re-apply until inside [0, n); at most 4x domain, so few rounds
        x[out_of_range] = feistel(x[out_of_range])
        out_of_range = x >= np.uint64(n)
    return x.astype(np.int64)


def stream_windows(positions: np.ndarray, n_windows: int, seed: int) -> np.ndarray:
    """Window index of each global stream position (int64 array): perm_{p // W}(p mod W)."""
    epochs, idx = positions // n_windows, positions % n_windows
    out = np.empty_like(positions)
    for e in np.unique(epochs):  # a batch spans at most two epochs in practice
        sel = epochs == e
        out[sel] = permute(idx[sel], n_windows, seed, int(e))
    return out


# ----------------------------------------------------------------------------------------------
# dataset and shards


def resolve_data_dir(data_dir: str) -> str:
    """data_dir as given, or data/<data_dir> under the repository when only a name is given."""
    if not os.path.isdir(data_dir) and os.path.isdir(os.path.join(ROOT, "data", data_dir)):
        return os.path.join(ROOT, "data", data_dir)
    return data_dir


def _prepare_command(data_dir: str) -> str:
    script = os.path.join(data_dir, "prepare.py")
    if os.path.isfile(script):
        rel = os.path.relpath(script)
        return f"python {rel if not rel.startswith('..') else script}"
    folders = sorted(n for n in os.listdir(os.path.join(ROOT, "data"))
                     if os.path.isfile(os.path.join(ROOT, "data", n, "prepare.py")))
    return (f"python data/DATASET/prepare.py --input=YOUR_TEXT --out_dir={data_dir}, with the DATASET folder of "
            f"the tokenizer you want ({', '.join(folders)})")


def vocab_mismatch(meta: dict, vocab_size: int) -> str | None:
    """Why a model of vocab_size should not train on this dataset, or None. Ids must fit the model; and a
    model whose vocabulary is far larger than the data's (a LLaMA-3 preset's 128,256 on 84 characters) has
    output rows no token ever trains, which is a forgotten --vocab_size or the wrong tokenizer's data. A
    few unused rows are normal: the 64-padding of GPT-2 and tiny test models, Qwen3's reserved ids."""
    n, name = meta["vocab_size"], meta.get("tokenizer", {}).get("name", "its tokenizer")
    if n > vocab_size:
        return f"the dataset's {name} tokenizer has {n:,} ids but the model's vocab_size is {vocab_size:,}"
    if vocab_size - n > 1024 and vocab_size > 2 * n:
        return (f"the dataset was tokenized with {name} ({n:,} ids) but the model's vocab_size is {vocab_size:,}: "
                f"{vocab_size - n:,} output rows would never see a token")
    return None


def read_meta(data_dir: str, split: str = "train") -> dict:
    """Parsed meta.json of a prepared dataset, with a DataError naming prepare.py when it is missing."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        first = os.path.join(data_dir, f"{split}.bin")
        if not (os.path.isfile(first) or os.path.isfile(os.path.join(data_dir, f"{split}_000000.bin"))):
            raise DataError(f"dataset not found: {first}; run: {_prepare_command(data_dir)}")
        raise DataError(f"{path} is missing (preparation unfinished, or made by an older prepare.py); "
                        f"run: {_prepare_command(data_dir)}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); re-run: {_prepare_command(data_dir)}") from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise DataError(f"{path} is not a {FORMAT} meta.json with dtype uint16/uint32; "
                        f"re-run: {_prepare_command(data_dir)}")
    return meta


class Shards:
    """One split's shards, memory-mapped lazily (per process, so DataLoader workers open their own)."""

    def __init__(self, data_dir: str, split: str, block_size: int, vocab_size: int | None = None) -> None:
        data_dir = resolve_data_dir(data_dir)
        self.meta = meta = read_meta(data_dir, split)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}/meta.json has no {split!r} split (has: {', '.join(meta['splits'])})")
        if block_size < 1:
            raise DataError(f"block_size must be positive, got {block_size}")
        info = meta["splits"][split]
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.vocab_size = vocab_size if vocab_size is not None else int(meta["vocab_size"])
        self.block_size, self.split, self.data_dir = block_size, split, data_dir
        if meta["vocab_size"] > self.vocab_size or info["max_token_id"] >= self.vocab_size:
            raise DataError(f"{data_dir} was prepared with the {meta['tokenizer']['name']} tokenizer (vocab_size "
                            f"{meta['vocab_size']}, largest id {info['max_token_id']}) but the model's vocab_size is "
                            f"{self.vocab_size}; use a model vocab_size >= {meta['vocab_size']}")
        self.paths, self.lengths = [], []
        for shard in info["shards"]:
            path = os.path.join(data_dir, shard["file"])
            if not os.path.isfile(path):
                raise DataError(f"shard {path} listed in meta.json is missing; re-run: {_prepare_command(data_dir)}")
            size = os.path.getsize(path)
            if size % self.dtype.itemsize:
                raise DataError(f"shard {path} is {size} bytes, not a multiple of {self.dtype.name} "
                                f"({self.dtype.itemsize} bytes): truncated or not {self.dtype.name}; "
                                f"re-run: {_prepare_command(data_dir)}")
            if size // self.dtype.itemsize != shard["tokens"]:
                raise DataError(f"shard {path} holds {size // self.dtype.itemsize} {self.dtype.name} tokens but "
                                f"meta.json says {shard['tokens']}; re-run: {_prepare_command(data_dir)}")
            self.paths.append(path)
            self.lengths.append(shard["tokens"])
        # Windows per shard and their cumulative ends: O(number of shards) memory.
        self.shard_windows = np.array([max(0, (n - 1) // block_size) for n in self.lengths], dtype=np.int64)
        self.window_ends = np.cumsum(self.shard_windows)
        self.n_windows = int(self.window_ends[-1]) if len(self.window_ends) else 0
        if sum(self.lengths) == 0:
            raise DataError(f"the {split} split of {data_dir} is empty; re-run prepare.py with a --val_fraction "
                            "that gives it documents")
        if self.n_windows == 0:
            raise DataError(f"block_size={block_size} needs windows of {block_size + 1} tokens but the longest shard "
                            f"of the {split} split of {data_dir} has {max(self.lengths):,} tokens; use a block_size "
                            f"of at most {max(self.lengths) - 1:,} or more data")
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # never pickle a memmap (it would copy the data)

    def read(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of the given windows as an int64 array (len(windows), block_size + 1)."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        shard = np.searchsorted(self.window_ends, windows, side="right")
        offset = (windows - (self.window_ends[shard] - self.shard_windows[shard])) * self.block_size
        T1 = self.block_size + 1
        out = np.empty((len(windows), T1), dtype=np.int64)
        for j, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            out[j] = self._maps[s][o:o + T1]
        if out.size and (out.max() >= self.vocab_size):
            j = int(np.argmax(out.max(1) >= self.vocab_size))
            raise DataError(f"{self.paths[shard[j]]} holds token id {int(out[j].max())} >= vocab_size "
                            f"{self.vocab_size} near token {int(offset[j])}; the shard is corrupt or from another "
                            f"tokenizer; re-run: {_prepare_command(self.data_dir)}")
        return out


class MicroBatches(torch.utils.data.Dataset):
    """Rank `rank`'s micro-batch number k of the global stream, as contiguous int64 (x, y) of (B, T)."""

    def __init__(self, shards: Shards, batch_size: int, grad_accum: int, rank: int, world_size: int,
                 seed: int) -> None:
        self.shards, self.B, self.grad_accum = shards, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def positions(self, k: int) -> np.ndarray:
        """Global stream positions of this rank's micro-step k (B,)."""
        step, micro = divmod(k, self.grad_accum)
        G = self.B * self.grad_accum * self.world_size
        start = step * G + (micro * self.world_size + self.rank) * self.B
        return np.arange(start, start + self.B, dtype=np.int64)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.shards.read(stream_windows(self.positions(k), self.shards.n_windows, self.seed))
        return torch.from_numpy(xy[:, :-1].copy()), torch.from_numpy(xy[:, 1:].copy())


class _CountFrom(torch.utils.data.Sampler):
    """k, k+1, k+2, ... forever: the DataLoader's micro-step indices."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class TokenLoader:
    """Training batches for one rank; see the module docstring for the sampling scheme.

    batch_size: sequences per rank per micro-step; grad_accum: micro-steps per rank per optimizer step;
    the global batch is G = batch_size * grad_accum * world_size sequences per optimizer step.
    """

    def __init__(self, data_dir: str, split: str, block_size: int, batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, vocab_size: int | None = None,
                 device: str | torch.device = "cpu", use_dataloader: bool = False, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        if batch_size < 1 or grad_accum < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1, grad_accum >= 1 and 0 <= rank < world_size; got "
                            f"{batch_size}, {grad_accum}, rank {rank} of {world_size}")
        self.shards = Shards(data_dir, split, block_size, vocab_size)
        self.meta = self.shards.meta
        self.data = MicroBatches(self.shards, batch_size, grad_accum, rank, world_size, seed)
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch_size = batch_size * grad_accum * world_size
        self.device = torch.device(device)
        self.use_dataloader, self.num_workers = use_dataloader, num_workers
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.micro_step = 0  # micro-steps this rank has taken
        self._iter: Iterator | None = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (batch_size, block_size) on device for this rank's next micro-step."""
        if self.use_dataloader:
            if self._iter is None:
                loader = torch.utils.data.DataLoader(
                    self.data, batch_size=None, sampler=_CountFrom(self.micro_step), num_workers=self.num_workers,
                    pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
                self._iter = iter(loader)
            x, y = next(self._iter)
        else:
            x, y = self.data[self.micro_step]
            if self.pin_memory:
                x, y = x.pin_memory(), y.pin_memory()
        self.micro_step += 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """Where the stream is: enough to continue it exactly after a restart."""
        step, micro = divmod(self.micro_step, self.grad_accum)
        return {"version": 1, "seed": self.seed, "block_size": self.block_size,
                "global_batch_size": self.global_batch_size, "step": step, "micro_step": micro,
                "split": (self.batch_size, self.grad_accum, self.world_size)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the stream saved by state_dict(), possibly on another world size with the same G."""
        mine = self.state_dict()
        for key in ("version", "seed", "block_size", "global_batch_size"):
            if sd.get(key) != mine[key]:
                raise DataError(f"loader state has {key}={sd.get(key)} but this run has {mine[key]}; the stream "
                                f"would differ, so resume with the same {key}")
        if sd["micro_step"] and tuple(sd["split"]) != mine["split"]:
            raise DataError("loader state is mid-step, so it needs the same batch_size, grad_accum and world_size")
        self.micro_step = sd["step"] * self.grad_accum + sd["micro_step"]
        self._iter = None  # a DataLoader restarts from the restored micro-step


class EvalBatches:
    """A fixed sequence of (x, y) batches of (batch_size, block_size), read lazily: the same windows in
    the same order on every pass, holding one batch in memory at a time."""

    def __init__(self, data: MicroBatches, n_batches: int, device: torch.device) -> None:
        self.data, self.n_batches, self.device = data, n_batches, device

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k < self.n_batches:
            raise IndexError(k)
        x, y = self.data[k]
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[k] for k in range(self.n_batches))


def eval_batches(data_dir: str, split: str, block_size: int, batch_size: int, n_batches: int, rank: int = 0,
                 world_size: int = 1, vocab_size: int | None = None, device: str | torch.device = "cpu",
                 seed: int = EVAL_SEED) -> EvalBatches:
    """n_batches fixed (x, y) batches of (batch_size, block_size) for this rank, identical on every pass."""
    shards = Shards(data_dir, split, block_size, vocab_size)
    data = MicroBatches(shards, batch_size, 1, rank, world_size, seed)
    return EvalBatches(data, n_batches, torch.device(device))


def available_host_bytes() -> int:
    """Memory the host can still give this process: MemAvailable from /proc/meminfo, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sizes(windows: dict[str, int], block_size: int, batch_size: int, grad_accum: int, world_size: int,
                eval_iters: int, host_bytes: int) -> None:
    """DataError when the batches cannot be drawn from the splits or one batch cannot fit in host memory.

    windows: {split: number of block_size + 1 windows}; grad_accum: micro-steps per rank per step.
    """
    G = batch_size * grad_accum * world_size  # sequences per optimizer step, and per eval batch round
    train = windows["train"]
    if G > train:
        raise DataError(f"the global batch of {G:,} sequences (batch_size {batch_size} x {grad_accum * world_size} "
                        f"micro-steps) is larger than the train split's {train:,} windows of {block_size + 1} tokens; "
                        f"lower batch_size to at most {max(1, train // (grad_accum * world_size)):,}")
    for split, n in sorted(windows.items(), key=lambda kv: kv[1]):  # the smallest split bounds eval_iters
        if eval_iters * G > n:
            raise DataError(f"eval_iters={eval_iters} reads {eval_iters * G:,} sequences ({eval_iters} x {G:,}) but "
                            f"the {split} split has {n:,} windows of {block_size + 1} tokens; lower eval_iters to "
                            f"at most {max(1, n // G):,}")
    # one micro-batch on the host: the int64 windows read (B, T + 1) and the x, y copies (B, T) each
    need = 8 * batch_size * (3 * block_size + 1)
    if need > host_bytes:
        raise DataError(f"one batch of {batch_size:,} x {block_size:,} tokens needs {need / 1024**3:.1f} GiB of host "
                        f"memory and {host_bytes / 1024**3:.1f} GiB is available; lower batch_size or block_size")


def split_windows(data_dir: str, block_size: int, vocab_size: int | None = None) -> dict[str, int]:
    """{split: number of block_size + 1 windows} for train and val (checks the shards, reads no tokens)."""
    return {split: Shards(data_dir, split, block_size, vocab_size).n_windows for split in ("train", "val")}
