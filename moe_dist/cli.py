"""What the command-line programs share: errors as one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it (argparse prints its usage first), then exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def error_line(program: str, error: Exception) -> str:
    """One line for an expected error: our own errors carry their line; an OSError names its file."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{program}: {where}{error.strerror}"
    return str(error)
