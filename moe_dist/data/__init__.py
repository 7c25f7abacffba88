"""Data: byte-level BPE tokenizer, text -> Arrow token shards, memory-mapped rank-disjoint loader."""


class DataError(ValueError):
    """Bad or missing data; its message is one line naming the offending file or directory."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
