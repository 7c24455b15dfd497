"""Segment-by-segment tokenization equals tokenizing the whole text, on byte-level BPE and on
llama-2-style sentencepiece tokenizers (the dummy "▁" prefix pitfall)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from data import DataError, Segment, load_template
from data.encode import SegmentEncoder, TokenizerInfo
from data.readers import Source, read_records, source_files
from data.sample_types import parse_sample
from data.template import sample_segments

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["bpe", "bpe-nobos", "spm", "spm-legacy"]

TRICKY = [
    {"type": "pretrain", "text": " starts with a space"},
    {"type": "pretrain", "text": "\nstarts with a newline, ends with spaces  "},
    {"type": "pretrain", "text": "中文开头, then English 和中文 mixed 123456"},
    {"type": "instruct", "instruct": "  spaces around  ", "output": "  answer with spaces  "},
    {
        "type": "instruct",
        "instruct": "中文问题",
        "input": " 输入 with English",
        "output": "English answer 中文答案",
    },
    {
        "type": "conversation",
        "rounds": [["ask", "Q"], ["ans", "\n\nA after newlines"], ["ask", " Q2"], ["ans", "'s"]],
    },
    {
        "type": "messages",
        "messages": [
            {"role": "user", "content": "text with </s> inside"},
            {"role": "assistant", "content": "▁already ▁marked"},
        ],
    },
    {
        "type": "messages",
        "messages": [{"role": "user", "content": "emoji 🙂"}, {"role": "assistant", "content": "🙂!"}],
    },
]


def _all_samples() -> list[tuple[str, object]]:
    samples = []
    for source in (REPO / "data" / "samples", REPO / "tests" / "fixtures" / "seed_example.json"):
        for path in source_files(Source(source)):
            samples += [parse_sample(r.value, r.where) for r in read_records(path)]
    return samples + [parse_sample(value, f"tricky {i}") for i, value in enumerate(TRICKY)]


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_segments_tokenize_like_the_whole_text(
    family: str, train_on_prompt: bool, data_tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    tokenizer = data_tokenizers[family]
    encoder = SegmentEncoder(tokenizer)
    info = encoder.info
    rendered = [
        sample_segments(s, load_template(), bos=info.bos, eos=info.eos, train_on_prompt=train_on_prompt)
        for _, s in _all_samples()
    ]
    for segments, segment_ids in zip(rendered, encoder.encode(rendered)):
        whole = tokenizer("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
        assert [i for ids in segment_ids for i in ids] == whole, segments


def test_every_answer_ends_with_a_trained_eos(data_tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    for tokenizer in data_tokenizers.values():
        encoder = SegmentEncoder(tokenizer)
        rendered = [
            sample_segments(s, load_template(), bos=encoder.info.bos, eos=encoder.info.eos)
            for _, s in _all_samples()
        ]
        for segments, segment_ids in zip(rendered, encoder.encode(rendered)):
            for segment, ids in zip(segments, segment_ids):
                assert not segment.trained or ids[-1] == tokenizer.eos_token_id


def test_tokenizer_info(data_tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    bpe, nobos, sp = (TokenizerInfo(data_tokenizers[k]) for k in ("bpe", "bpe-nobos", "spm"))
    assert (bpe.bos, bpe.eos, bpe.eos_id, bpe.pad_id) == ("<s>", "</s>", 2, 0)
    assert nobos.bos == ""
    assert (sp.bos, sp.pad_id) == ("<s>", 2)  # no pad token: pad with eos


def test_boundary_must_follow_newline_or_special_token(data_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(
        DataError, match="a segment boundary follows 'Assistant: ', which ends neither with a newline"
    ):
        SegmentEncoder(data_tokenizer).encode([[Segment("Assistant: ", False), Segment("Hi</s>", True)]])


def test_whole_text_check_reports_a_mismatch(data_tokenizer: PreTrainedTokenizerBase) -> None:
    encoder = SegmentEncoder(data_tokenizer)
    segments = [Segment("Hello", False)]
    with pytest.raises(
        DataError, match="x.json: sample 0: tokenizing segment by segment gives different ids"
    ):
        encoder.check_whole_text(segments, [[1, 2, 3]], "x.json: sample 0")
