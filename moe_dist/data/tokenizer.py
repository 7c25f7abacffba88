"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, load, hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_dist.data import DataError, one_line

EOS_TOKEN = "<|endoftext|>"  # ends every document; id 0 in tokenizers trained here
TOKENIZER_CONFIG = "tokenizer_config.json"  # beside a Hugging Face tokenizer.json: names its special tokens
MIN_VOCAB = 257  # 256 byte symbols + EOS_TOKEN


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most vocab_size tokens, EOS_TOKEN first."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"data: vocab_size {vocab_size} is too small for a byte-level tokenizer (min {MIN_VOCAB})")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space, so that decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even ones unseen in training
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the bindings raise a bare Exception for missing and malformed files alike
        raise DataError(f"data: {path}: not a loadable tokenizer.json ({one_line(e)})") from None


def tokenizer_config(path: Path) -> dict:
    """The Hugging Face tokenizer_config.json beside tokenizer file `path`, {} where there is none."""
    try:
        config = json.loads((Path(path).parent / TOKENIZER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _token_text(value: object) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value  # older files hold an AddedToken dict
    return value if isinstance(value, str) and value else None


def eos_token(path: Path) -> str:
    """The end-of-document token of tokenizer file `path`: the eos_token of a Hugging Face tokenizer_config.json
    beside it, else EOS_TOKEN."""
    return _token_text(tokenizer_config(path).get("eos_token")) or EOS_TOKEN


def bos_token(path: Path) -> str | None:
    """The bos_token of a Hugging Face tokenizer_config.json beside tokenizer file `path`, if it names one."""
    return _token_text(tokenizer_config(path).get("bos_token"))


def bos_id(tokenizer: Tokenizer, path: Path) -> int | None:
    """The id of the token that starts every document, where a tokenizer_config.json beside `path` asks for one
    (add_bos_token, as Llama and Mixtral do); None where documents start with their text."""
    token = bos_token(path) if tokenizer_config(path).get("add_bos_token") else None
    if token is None:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(f"data: {path}: tokenizer has no {token} token (the bos_token of its {TOKENIZER_CONFIG})")
    return token_id


def eos_id(tokenizer: Tokenizer, path: Path) -> int:
    """The id of eos_token(path); DataError naming the tokenizer file if it has none."""
    token = eos_token(path)
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(f"data: {path}: tokenizer has no {token} token")
    return token_id


def file_hash(path: Path) -> str:
    """First 16 hex digits of the file's sha256: identifies a tokenizer by content."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
