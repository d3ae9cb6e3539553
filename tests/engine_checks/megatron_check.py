"""
Checks run inside the megatron-core venv (recipes/engine_venvs.sh megatron) by tests/test_recipes_engines.py.

    python megatron_check.py CASE.json

CASE.json: {"check": "read", "prefixes": [[tokens, prefix], ...], "seq_len": T} reads our converted shards
with megatron-core's IndexedDataset and builds a GPTDataset blend over them; {"check": "parse", ...} runs
Megatron-LM's argument parser from a checkout. Prints one JSON line.
"""

import json
import sys

import numpy as np
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset


class EodOnly:
    """What GPTDataset asks of a tokenizer when the data are already token ids."""

    def __init__(self, eod: int, vocab_size: int) -> None:
        self.eod, self.pad, self.vocab_size = eod, -1, vocab_size
        self.unique_identifiers = {"class": "EodOnly", "eod": eod}  # part of Megatron's cache key


def read(case: dict) -> dict:
    prefixes = [p for _, p in case["prefixes"]]
    documents = {}
    for p in prefixes:
        ds = IndexedDataset(p)
        documents[p] = [ds[i].tolist() for i in range(len(ds))]
        assert len(ds.document_indices) == len(ds) + 1
    T = case["seq_len"]
    config = GPTDatasetConfig(random_seed=1234, sequence_length=T, blend=(prefixes, [n for n, _ in case["prefixes"]]),
                              split="100,0,0", tokenizer=EodOnly(case.get("eod", 0), 2**31 - 1),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              create_attention_mask=False, path_to_cache=case.get("cache"))
    n_samples = 40
    # BlendedDataset builds its index on rank 0 and barriers: a one-process gloo group, as one rank would have.
    dist.init_process_group("gloo", init_method=f"file://{case['cache']}.rdzv", rank=0, world_size=1)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n_samples, 0, 0], lambda: True, config).build()
    # Every sample must be T+1 consecutive tokens of the documents, in the order Megatron's own index gives.
    ok = True
    for k in range(n_samples):
        d, i = int(train.dataset_index[k]), int(train.dataset_sample_index[k])
        gpt = train.datasets[d]
        docs = documents[prefixes[d]]
        stream = np.concatenate([np.asarray(docs[j], dtype=np.int64) for j in gpt.document_index])
        ends = np.cumsum([0] + [len(docs[j]) for j in gpt.document_index])
        doc_beg, off = gpt.sample_index[gpt.shuffle_index[i]]  # GPTDataset shuffles samples, then looks up
        start = int(ends[doc_beg]) + int(off)
        sample = gpt[i]
        got = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]])
        ok &= bool(np.array_equal(got, stream[start:start + T + 1]))
    return {"documents": documents, "gpt_samples_ok": ok, "n_datasets": len(train.datasets)}


def parse(case: dict) -> dict:
    """Megatron-LM's own parse_args + validate_args on the generated script's arguments (needs a checkout)."""
    import os
    sys.path.insert(0, case["megatron_lm"])
    os.environ.update({"WORLD_SIZE": str(case["ngpu"]), "RANK": "0", "LOCAL_RANK": "0"})
    from megatron.training.arguments import parse_args, validate_args
    sys.argv = ["pretrain_gpt.py"] + case["args"]
    args = validate_args(parse_args())
    return {"padded_vocab_size": getattr(args, "padded_vocab_size", None), "normalization": args.normalization,
            "rotary_base": args.rotary_base, "apply_layernorm_1p": args.apply_layernorm_1p}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        case = json.load(f)
    print(json.dumps({"read": read, "parse": parse}[case["check"]](case)))
