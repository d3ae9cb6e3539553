"""
Prepare SlimPajama-627B for LLaMA-3 tiktoken, streamed, 100M-token uint32 shards.

    python data/slimpajama_627b_llama3/prepare.py                       # hub dataset cerebras/SlimPajama-627B (needs internet)
    python data/slimpajama_627b_llama3/prepare.py --input my_corpus/    # local .txt/.jsonl/.parquet, offline

All flags: --help. The logic lives in dataprep.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataprep import Spec, main  # noqa: E402

SPEC = Spec(name="slimpajama_627b_llama3", tokenizer="llama3", hub="cerebras/SlimPajama-627B", streaming=True, shard_tokens=100_000_000, val_fraction=0.0001)

if __name__ == "__main__":
    main(SPEC)
