"""Samples -> masked, padded or packed token rows for training (see docs/architecture.md).

Usage:
    from data import DataSettings, load_rows
    rows = load_rows(DataSettings(paths="data/samples", max_seq_len=512), tokenizer,
                     cache_dir=Path("runs/x/data_cache"), builder=local_rank == 0)
"""

from data.encode import adds_bos, chat_template_for
from data.errors import DataError
from data.masking import IGNORE_INDEX, shift_labels
from data.rows import DataSettings, Rows, load_rows
from data.sample_types import SAMPLE_TYPES, Message
from data.template import (
    BUILTIN_TEMPLATES,
    TEMPLATE_FILENAME,
    PromptTemplate,
    Segment,
    load_template,
    save_template,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "SAMPLE_TYPES",
    "TEMPLATE_FILENAME",
    "DataError",
    "DataSettings",
    "Message",
    "PromptTemplate",
    "Rows",
    "Segment",
    "adds_bos",
    "chat_template_for",
    "load_rows",
    "load_template",
    "save_template",
    "shift_labels",
]
