"""
Prepare SlimPajama-6B for LLaMA-3 tiktoken (128,256 ids, uint32).

    python data/slimpajama_6b_llama3/prepare.py                       # hub dataset DKYoon/SlimPajama-6B (needs internet)
    python data/slimpajama_6b_llama3/prepare.py --input my_corpus/    # local .txt/.jsonl/.parquet, offline

All flags: --help. The logic lives in dataprep.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataprep import Spec, main  # noqa: E402

SPEC = Spec(name="slimpajama_6b_llama3", tokenizer="llama3", hub="DKYoon/SlimPajama-6B")

if __name__ == "__main__":
    main(SPEC)
