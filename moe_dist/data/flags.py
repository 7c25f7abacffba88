"""The flags prep stores beside every token, read by the loader (no torch here: prep's workers import it)."""

DOC_START = 1  # the first token of a document
LOSS = 2  # the token counts as a target
IGNORE = -100  # a target that does not count (cross_entropy's ignore_index)
