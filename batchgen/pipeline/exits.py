"""Ending a replica process on purpose, so that Ray starts a fresh one."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

#: Exit status of a replica process that ends on purpose (a CUDA error, a broken tensor-parallel
#: group, or the test hook's injected crash).
EXIT_ON_PURPOSE = 87


def exit_replica(why: str) -> NoReturn:
    """End this replica process on purpose (Ray restarts it), saying why on stderr."""
    print(f"batchgen replica pid {os.getpid()}: exiting on purpose ({why})", file=sys.stderr, flush=True)
    os._exit(EXIT_ON_PURPOSE)
