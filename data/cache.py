"""The on-disk cache of built rows: keyed by data, tokenizer and settings; built once, read by all.

One process (`builder=True`, e.g. local rank 0) writes the cache into a temporary directory, marks
it complete and renames it into place with `os.replace`, so a reader never sees a half-written
cache. Other processes poll until the complete directory appears. No torch.distributed needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from data.errors import DataError

CACHE_VERSION = 1
"""Bump when the cached format or the way rows are built changes: old caches are then ignored."""
COMPLETE_MARKER = "COMPLETE"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides the ids: the serialized fast tokenizer (or the vocab) and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(
        [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        sort_keys=True,
    )
    return hashlib.sha256((body + specials).encode("utf-8")).hexdigest()


def cache_key(parts: dict[str, object]) -> str:
    """A short hash of JSON-serialisable key parts (data digests, tokenizer digest, settings)."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def build_once(final: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)`, then atomically move tmp_dir to `final`. If another builder got there
    first, keep theirs (they hold the same content) and drop ours."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def wait_until_complete(final: Path, *, timeout_s: float) -> None:
    """Block until another process has finished building `final` (polling: 50 ms, growing to 2 s)."""
    deadline = time.monotonic() + timeout_s
    poll_s = 0.05
    while not is_complete(final):
        if time.monotonic() > deadline:
            raise DataError(
                f"waited {timeout_s:.0f} s for the data cache {final} to be built, in vain: the builder "
                "process (builder=True, normally local rank 0) may have failed or be slow; check its log, "
                "or raise the timeout"
            )
        time.sleep(poll_s)
        poll_s = min(2.0, poll_s * 1.5)
