"""Cleanup DeepSpeed's CPU backend leaves to its users.

DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates one shared-memory file
per rank, `deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>` (about 33 MB), and
never unlinks it: without this, every CPU run leaves its buffers in /dev/shm, i.e. in RAM.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffers(port: str | int, rank: str | int = "*") -> list[Path]:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"))


def release_shm_buffer() -> None:
    """Unlink this rank's buffer. Safe once the process group exists: every rank maps all the
    buffers when it initialises, and a mapping outlives the name."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if port is None or rank is None:
        return
    for path in shm_buffers(port, rank):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
