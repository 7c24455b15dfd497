"""Shared fixtures. Data-package fixtures are prefixed `data_`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
DATA_TINY_TOKENIZER = REPO / "configs" / "tiny-llama"


@pytest.fixture(scope="session")
def data_tokenizer() -> PreTrainedTokenizerBase:
    """The shipped quickstart tokenizer: byte-level BPE, adds <s>, eos </s>, pad <pad>."""
    return AutoTokenizer.from_pretrained(DATA_TINY_TOKENIZER)


@pytest.fixture(scope="session")
def data_spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-2-style sentencepiece BPE model (byte fallback) trained on the shipped corpus."""
    lines = []
    for path in sorted((REPO / "data" / "tokenizer_corpus").glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=1200,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    directory = tmp_path_factory.mktemp("spm")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


@pytest.fixture(scope="session")
def data_tokenizers(
    data_tokenizer: PreTrainedTokenizerBase, data_spm_dir: Path
) -> dict[str, PreTrainedTokenizerBase]:
    """Tokenizer families the segment-wise encoding must handle:
    bpe: the shipped llama-3-style byte-level BPE that adds BOS;
    bpe-nobos: the same without BOS (how bloom and qwen2 tokenizers behave);
    spm: llama-2-style sentencepiece (Metaspace, "▁" prepended to the first piece only);
    spm-legacy: the same in legacy mode ("▁" also after every special token)."""
    return {
        "bpe": data_tokenizer,
        "bpe-nobos": AutoTokenizer.from_pretrained(DATA_TINY_TOKENIZER, add_bos_token=False),
        "spm": LlamaTokenizer.from_pretrained(data_spm_dir, legacy=False, add_bos_token=True),
        "spm-legacy": LlamaTokenizer.from_pretrained(data_spm_dir, legacy=True, add_bos_token=True),
    }
