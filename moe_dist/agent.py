"""python -m moe_dist.agent [torchrun options] -m moe_dist.train ...: torchrun as the launcher runs it.

Two differences from plain torchrun. It ends with the launcher that started it (moe_dist.lifetime), so a
kill -9 of the launcher ends the job. And when the ranks failed with the trainer's exit codes (1: the run could
not go on, 2: bad input), each after printing its one-line error, it exits with that code instead of adding
torchrun's failure report (some 40 lines and a traceback restating "exitcode 2"). A rank that died of an
uncaught exception also exits 1, after printing its own traceback, which the report would only point at; a
rank killed by a signal keeps the report.
"""

from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from moe_dist.lifetime import end_children_with_this_process, exit_with_parent

TRAINER_EXIT_CODES = (1, 2)  # moe_dist.train's, after its one line on stderr
_FAILED = "failed (exitcode: %s)"  # how torchrun's process context logs the first failed rank
# ... and the ranks still running when it did, which it stops: ours stop together, one a moment after another.
_CLOSING = "Sending process %s closing signal %s"


class _TrainerFailures(logging.Filter):
    """Drops torchrun's 'failed (exitcode: 2) local_rank: 0 ...' line for the trainer's own exit codes, and its
    'closing signal' lines for the ranks that were leaving anyway (its report, where kept, lists every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        failed = record.msg.startswith(_FAILED) and record.args and record.args[0] in TRAINER_EXIT_CODES
        return not (failed or record.msg.startswith(_CLOSING))


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()
    os.environ.update(end_children_with_this_process({}))  # the ranks inherit it
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_TrainerFailures())
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if not codes <= set(TRAINER_EXIT_CODES):
            raise
        return max(codes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
