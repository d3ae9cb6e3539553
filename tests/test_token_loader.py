import json
import os

import numpy as np
import pytest
import torch

import token_loader
from token_loader import DataError, TokenLoader, eval_batches, permute

VOCAB = 100_000  # above uint16, so these shards are uint32 and ids > 65535 must survive


def make_dataset(d, shard_lengths: list[int], val_lengths: list[int] = (500,), dtype: str = "uint32") -> str:
    """Shards whose token at global position p is p (mod VOCAB): every window shows where it came from."""
    d = str(d)
    os.makedirs(d, exist_ok=True)
    meta = {"format": token_loader.FORMAT, "dtype": dtype, "vocab_size": VOCAB, "tokenizer": {"name": "test"},
            "splits": {}}
    pos = 0
    for split, lengths in (("train", shard_lengths), ("val", val_lengths)):
        shards = []
        for k, n in enumerate(lengths):
            ids = (np.arange(pos, pos + n) + 65_000) % VOCAB
            pos += n
            ids.astype(dtype).tofile(os.path.join(d, f"{split}_{k:06d}.bin"))
            shards.append({"file": f"{split}_{k:06d}.bin", "tokens": n})
        meta["splits"][split] = {"tokens": sum(lengths), "documents": 1, "shards": shards,
                                 "max_token_id": VOCAB - 1}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d


@pytest.fixture
def data(tmp_path) -> str:
    return make_dataset(tmp_path / "ds", [301, 17, 450, 5, 260])


def batches(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def global_steps(data: str, world_size: int, grad_accum: int, batch_size: int, steps: int,
                 **kw) -> list[torch.Tensor]:
    """The x of every optimizer step, concatenated over micro-steps and ranks in global position order."""
    loaders = [TokenLoader(data, "train", 16, batch_size, grad_accum, rank=r, world_size=world_size, **kw)
               for r in range(world_size)]
    out = []
    for _ in range(steps):
        parts = [[loaders[r].next_batch()[0] for r in range(world_size)] for _ in range(grad_accum)]
        out.append(torch.cat([x for micro in parts for x in micro]))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099])
def test_permute_is_a_bijection_that_changes_per_epoch(n: int) -> None:
    p0 = permute(np.arange(n), n, seed=1337, epoch=0)
    assert sorted(p0.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(p0, permute(np.arange(n), n, seed=1337, epoch=1))
        assert not np.array_equal(p0, permute(np.arange(n), n, seed=1338, epoch=0))
    assert np.array_equal(p0[n // 3:n // 2], permute(np.arange(n // 3, n // 2), n, seed=1337, epoch=0))


def test_windows_stay_inside_shards_and_cover_each_window_once_per_epoch(data: str) -> None:
    loader = TokenLoader(data, "train", 16, 1, vocab_size=VOCAB)
    W = loader.shards.n_windows
    assert W == sum((n - 1) // 16 for n in [301, 17, 450, 5, 260])
    ends = np.cumsum([301, 17, 450, 5, 260])
    starts, top = [], 0
    for x, y in batches(loader, W):
        top = max(top, int(x.max()))
        row = torch.cat([x[0], y[0, -1:]]).numpy().astype(np.int64) - 65_000  # global positions of the window
        assert np.array_equal(row, np.arange(row[0], row[0] + 17))  # contiguous
        assert np.searchsorted(ends, row[0], "right") == np.searchsorted(ends, row[-1], "right")  # one shard
        starts.append(int(row[0]))
    assert len(set(starts)) == W  # an epoch visits every window exactly once
    assert (x.dtype, x.shape) == (torch.int64, (1, 16)) and torch.equal(x[0, 1:], y[0, :-1])
    assert top > 65535


def test_global_batches_independent_of_world_size_and_micro_split(data: str) -> None:
    one_rank = global_steps(data, world_size=1, grad_accum=4, batch_size=2, steps=6)
    two_ranks = global_steps(data, world_size=2, grad_accum=2, batch_size=2, steps=6)
    four_ranks_big_micro = global_steps(data, world_size=2, grad_accum=1, batch_size=4, steps=6)
    for a, b, c in zip(one_rank, two_ranks, four_ranks_big_micro):
        assert torch.equal(a, b) and torch.equal(a, c)
    other_seed = global_steps(data, world_size=1, grad_accum=4, batch_size=2, steps=1, seed=7)
    assert not torch.equal(one_rank[0], other_seed[0])


def test_ranks_are_disjoint_and_read_only_their_part(data: str, monkeypatch: pytest.MonkeyPatch) -> None:
    read: dict[int, list[int]] = {0: [], 1: []}
    loaders = [TokenLoader(data, "train", 16, 3, 2, rank=r, world_size=2) for r in range(2)]
    for r, loader in enumerate(loaders):
        orig = loader.shards.read
        monkeypatch.setattr(loader.shards, "read", lambda w, r=r, orig=orig: (read[r].extend(w.tolist()), orig(w))[1])
        batches(loader, 4)  # 2 optimizer steps: 2 * 12 = 24 windows < W, so all distinct
    assert len(read[0]) == len(read[1]) == 12
    assert not set(read[0]) & set(read[1])
    assert len(set(read[0]) | set(read[1])) == 24


def test_resume_continues_the_exact_stream(data: str) -> None:
    ref = TokenLoader(data, "train", 16, 2, 3, seed=5)
    batches(ref, 7)
    sd = ref.state_dict()
    want = batches(ref, 9)  # crosses an epoch boundary: W = 65 windows, 2 per micro-step
    again = TokenLoader(data, "train", 16, 2, 3, seed=5)
    again.load_state_dict(sd)
    got = batches(again, 9)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(want, got))
    with pytest.raises(DataError, match="seed"):
        TokenLoader(data, "train", 16, 2, 3, seed=6).load_state_dict(sd)
    with pytest.raises(DataError, match="mid-step"):
        TokenLoader(data, "train", 16, 3, 2, seed=5).load_state_dict(sd)


def test_resume_on_another_world_size_at_a_step_boundary(data: str) -> None:
    single = TokenLoader(data, "train", 16, 2, 4)
    batches(single, 8)  # two optimizer steps
    sd = single.state_dict()
    want = torch.cat([x for x, _ in batches(single, 4)])
    ranks = [TokenLoader(data, "train", 16, 2, 2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(sd)
    got = torch.cat([ranks[r].next_batch()[0] for _ in range(2) for r in range(2)])
    assert torch.equal(want, got)


def test_dataloader_workers_match_the_in_process_path(data: str) -> None:
    plain = TokenLoader(data, "train", 16, 4, 2)
    workers = TokenLoader(data, "train", 16, 4, 2, use_dataloader=True, num_workers=2, pin_memory=True)
    a, b = batches(plain, 6), batches(workers, 6)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    resumed = TokenLoader(data, "train", 16, 4, 2, use_dataloader=True, num_workers=2)
    resumed.load_state_dict(workers.state_dict())
    c, d = batches(plain, 3), batches(resumed, 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(c, d))


def test_eval_batches_are_fixed_and_split_across_ranks(data: str) -> None:
    a = eval_batches(data, "val", 16, 2, 3)
    b = eval_batches(data, "val", 16, 2, 3)
    assert len(a) == 3 and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    r0 = eval_batches(data, "val", 16, 1, 3, rank=0, world_size=2)
    r1 = eval_batches(data, "val", 16, 1, 3, rank=1, world_size=2)
    assert torch.equal(torch.cat([torch.cat([p[0], q[0]]) for p, q in zip(r0, r1)]), torch.cat([x for x, _ in a]))
    assert int(a[0][0].min()) - 65_000 >= sum([301, 17, 450, 5, 260])  # val tokens, not train


def test_missing_dataset_names_prepare(tmp_path) -> None:
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "prepare.py").write_text("")
    with pytest.raises(DataError, match=r"dataset not found: .*mydata/train\.bin; run: python .*mydata/prepare\.py"):
        TokenLoader(str(tmp_path / "mydata"), "train", 16, 2)
    with pytest.raises(DataError, match=r"dataset not found: .*nothing/train\.bin; run: python data/DATASET/prepare\.py "
                                        r"--input=YOUR_TEXT --out_dir=.*nothing, with the DATASET folder"):
        TokenLoader(str(tmp_path / "nothing"), "train", 16, 2)
    np.zeros(10, np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenLoader(str(tmp_path), "train", 16, 2)


def test_shard_size_not_a_multiple_of_dtype(data: str) -> None:
    with open(os.path.join(data, "train_000001.bin"), "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=r"train_000001\.bin is 69 bytes, not a multiple of uint32"):
        TokenLoader(data, "train", 16, 2)


def test_meta_disagreeing_with_the_shard(data: str) -> None:
    meta = json.load(open(os.path.join(data, "meta.json")))
    meta["dtype"] = "uint16"  # the files are uint32: twice as many uint16 "tokens" as meta says
    json.dump(meta, open(os.path.join(data, "meta.json"), "w"))
    with pytest.raises(DataError, match=r"holds 602 uint16 tokens but meta.json says 301"):
        TokenLoader(data, "train", 16, 2)


def test_token_ids_at_or_above_vocab_size(tmp_path, data: str) -> None:
    with pytest.raises(DataError, match="model's vocab_size is 50304"):
        TokenLoader(data, "train", 16, 2, vocab_size=50304)
    # A shard corrupted after preparation: meta.json still claims small ids, the batch check catches it.
    d = make_dataset(tmp_path / "small", [200], dtype="uint16")
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["vocab_size"] = 1000
    meta["splits"]["train"]["max_token_id"] = 999
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    loader = TokenLoader(d, "train", 16, 4)
    with pytest.raises(DataError, match=r"holds token id \d+ >= vocab_size 1000"):
        batches(loader, 4)


def test_block_size_larger_than_every_shard(data: str) -> None:
    with pytest.raises(DataError, match=r"block_size=1000 needs windows of 1001 tokens but the longest shard"):
        TokenLoader(data, "train", 1000, 2)


def test_empty_split_says_how_to_fill_it(tmp_path) -> None:
    d = make_dataset(tmp_path / "noval", [300], val_lengths=[])
    assert TokenLoader(d, "train", 16, 2).next_batch()[0].shape == (2, 16)
    with pytest.raises(DataError, match="val split of .* is empty; re-run prepare.py with a --val_fraction"):
        eval_batches(d, "val", 16, 2, 1)
