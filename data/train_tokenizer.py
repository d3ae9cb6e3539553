"""
Train a SentencePiece BPE tokenizer (LLaMA-2 style) from local text.

    python data/train_tokenizer.py --input data/shakespeare_char/input.txt --vocab_size 4096 \
        --out data/.cache/tokenizer.model

Settings follow LLaMA-2's tokenizer: BPE, byte fallback (no unknown characters), digits split,
identity normalization and whitespace kept as is (so decode(encode(text)) == text), <unk>=0,
<s>=1, </s>=2. Use the result with --tokenizer llama2 --tokenizer_path PATH in any prepare.py.
--input takes what prepare.py takes: .txt/.jsonl/.parquet files or a folder of them.
"""

import os
import sys
import tempfile
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import errors  # noqa: E402
from dataprep import PrepareError, local_source  # noqa: E402


def sentences(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, cut to at most max_bytes bytes (SentencePiece's limit)."""
    for doc in docs:
        for line in doc.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def main(argv: list[str] | None = None) -> int:
    return errors.run_command(lambda: train(argv))


def train(argv: list[str] | None) -> int:
    p = errors.ArgumentParser(description="Train a LLaMA-2-style SentencePiece BPE tokenizer from local text.")
    p.add_argument("--input", required=True, help=".txt/.jsonl/.parquet file or folder of them")
    p.add_argument("--out", default="tokenizer.model", help="where to write the SentencePiece model")
    p.add_argument("--vocab_size", type=int, default=32000, help="pieces in the trained model")
    p.add_argument("--max_sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--num_threads", type=int, default=len(os.sched_getaffinity(0)), help="training threads (default: the usable cores)")
    args = p.parse_args(argv)
    import sentencepiece as spm

    max_bytes = 4192
    source = local_source(args.input)
    if args.vocab_size < 260:
        raise PrepareError(f"--vocab_size must be at least 260 (3 specials + 256 byte pieces), got {args.vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(source.documents(), max_bytes), model_prefix=prefix,
                model_type="bpe", vocab_size=args.vocab_size, character_coverage=0.99995, byte_fallback=True,
                split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
                pad_id=-1, max_sentence_length=max_bytes, input_sentence_size=args.max_sentences,
                shuffle_input_sentence=True, num_threads=args.num_threads, minloglevel=2)
        except RuntimeError as e:
            raise PrepareError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
        os.replace(prefix + ".model", args.out)  # atomic: a reader never sees half a model
    sp = spm.SentencePieceProcessor(model_file=args.out)
    print(f"wrote {args.out}: vocab_size {sp.get_piece_size()}, bos {sp.bos_id()}, eos {sp.eos_id()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
