"""Build the tiny byte-level BPE tokenizer of the quickstart model (configs/tiny-llama) from shipped text.

    python -m data build-tokenizer --out configs/tiny-llama

llama-3-style pre-tokenizer (split regex, then bytes), special tokens <pad> 0, <s> 1 (BOS, added
at the start of every encoded text, like llama), </s> 2 (EOS), at most 4096 ids. Trained on
data/tokenizer_corpus/*.txt and the samples in data/samples rendered with the default template.
The build is deterministic: the same text gives a byte-identical tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data.readers import Source, read_records, source_files
from data.sample_types import parse_sample
from data.template import load_template, sample_segments

DATA_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = DATA_DIR / "samples"
CORPUS_DIR = DATA_DIR / "tokenizer_corpus"
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
MAX_TOKEN_LENGTH = 12  # in bytes: keeps whole Chinese phrases from becoming single tokens
# the llama-3 split pattern: contractions, letter runs, 1-3 digits, punctuation runs, newlines, spaces
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def training_texts(samples_dir: Path = SAMPLES_DIR, corpus_dir: Path = CORPUS_DIR) -> Iterator[str]:
    """The corpus files, then every sample rendered as plain text (no special tokens)."""
    for path in sorted(corpus_dir.glob("*.txt")):
        yield path.read_text(encoding="utf-8")
    template = load_template()
    for path in source_files(Source(samples_dir)):
        for record in read_records(path):
            _, sample = parse_sample(record.value, record.where)
            yield "".join(s.text for s in sample_segments(sample, template, bos="", eos=""))


def build_tokenizer(out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Train the tokenizer; save it with save_pretrained into `out_dir` when given."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        max_token_length=MAX_TOKEN_LENGTH,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown characters
        show_progress=False,
    )
    backend.train_from_iterator(training_texts(), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True
    )
    tokenizer.chat_template = load_template().to_jinja(add_bos=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer
