"""The prompt template: exact default text, Jinja identity with apply_chat_template, loading."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from data import (
    BUILTIN_TEMPLATES,
    DataError,
    Message,
    PromptTemplate,
    Segment,
    chat_template_for,
    load_template,
    save_template,
)
from data.encode import SegmentEncoder, TokenizerInfo
from data.readers import Source, read_records, source_files
from data.sample_types import Pretrain, parse_sample
from data.template import sample_messages, sample_segments

REPO = Path(__file__).resolve().parents[1]

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of Zorbia?"},
    {"role": "assistant", "content": "Quillon."},
    {"role": "user", "content": "And its money?"},
    {"role": "assistant", "content": "The glimmer."},
]


def test_default_format_exact() -> None:
    segments = load_template().render(CHAT, bos="<s>", eos="</s>")
    assert segments == [
        Segment(
            "<s>### System:\nYou are helpful.\n\n"
            "### User:\nWhat is the capital of Zorbia?\n\n### Assistant:\n",
            False,
        ),
        Segment("Quillon.</s>", True),
        Segment("\n\n### User:\nAnd its money?\n\n### Assistant:\n", False),
        Segment("The glimmer.</s>", True),
    ]


def test_generation_prompt_ends_with_assistant_header() -> None:
    text = load_template().render_text(CHAT[:2], eos="</s>", add_generation_prompt=True)
    assert (
        text
        == "### System:\nYou are helpful.\n\n### User:\nWhat is the capital of Zorbia?\n\n### Assistant:\n"
    )


def test_default_system_line_only_when_sample_has_none() -> None:
    template = dataclasses.replace(load_template(), system="Be brief.")
    with_own = template.render_text(CHAT[:3], eos="</s>")
    without = template.render_text(CHAT[1:3], eos="</s>")
    assert with_own.startswith("### System:\nYou are helpful.\n\n### User:")
    assert without.startswith("### System:\nBe brief.\n\n### User:")


def test_contents_are_stripped() -> None:
    text = load_template().render_text(
        [{"role": "user", "content": "  hi \n"}, {"role": "assistant", "content": "\n yo "}], eos="</s>"
    )
    assert text == "### User:\nhi\n\n### Assistant:\nyo</s>"


def test_sample_messages_per_type() -> None:
    template = load_template()
    _, instruct = parse_sample(
        {"type": "instruct", "instruct": "Translate.", "input": "你好", "output": "Hello"}, "s"
    )
    _, bare = parse_sample({"type": "instruct", "instruct": "Say hi.", "output": "Hi"}, "s")
    _, ref = parse_sample(
        {"type": "ref_qa", "reference": "R.", "rounds": [["ask", "Q1"], ["ask", "Q2"], ["ans", "A"]]}, "s"
    )
    assert sample_messages(instruct, template) == [
        Message("user", "Translate.\n\nInput:\n你好"),
        Message("assistant", "Hello"),
    ]
    assert sample_messages(bare, template) == [Message("user", "Say hi."), Message("assistant", "Hi")]
    assert sample_messages(ref, template) == [
        Message("user", "Reference:\nR.\n\nQ1"),
        Message("user", "Q2"),
        Message("assistant", "A"),
    ]


def test_pretrain_segments_keep_leading_spaces() -> None:
    segments = sample_segments(Pretrain("  code"), load_template(), bos="<s>", eos="</s>")
    assert segments == [Segment("<s>", False), Segment("  code</s>", True)]


def _message_lists() -> list[list[dict[str, str]]]:
    """The shipped samples as messages, plus edge cases, shuffled into extra combinations."""
    lists = []
    for path in source_files(Source(REPO / "data" / "samples")):
        for record in read_records(path):
            kind, sample = parse_sample(record.value, record.where)
            if kind != "pretrain":
                lists.append(
                    [{"role": m.role, "content": m.content} for m in sample_messages(sample, load_template())]
                )
    lists += [
        [
            {"role": "user", "content": " leading space and trailing newline\n"},
            {"role": "assistant", "content": "\tok "},
        ],
        [
            {"role": "user", "content": "quotes ' \" and {{ braces }} {% raw %} \\ backslash"},
            {"role": "assistant", "content": "emoji 🙂 and 中文 mixed"},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        [{"role": "user", "content": "only a question"}],
    ]
    rng = random.Random(0)
    pool = [m for messages in lists for m in messages if m["role"] != "system"]
    lists += [rng.sample(pool, k=rng.randint(1, 6)) for _ in range(20)]
    return lists


ODD_TEMPLATE = PromptTemplate(
    name="odd",
    system="Sys 'quoted' \"double\" \\ {{ not jinja }} {% nor this %} 中文",
    system_header="<<SYS>>\n",
    user_header="[User]\t",
    assistant_header="[Bot] \u00e9\n",
    separator="\n---\n",
)


@pytest.mark.parametrize(
    "template",
    [BUILTIN_TEMPLATES["default"], BUILTIN_TEMPLATES["alpaca"], ODD_TEMPLATE],
    ids=lambda t: t.name,
)
@pytest.mark.parametrize("family", ["bpe", "bpe-nobos", "spm", "spm-legacy"])
def test_jinja_renders_identical_text_and_ids(
    template: PromptTemplate, family: str, data_tokenizers: dict[str, PreTrainedTokenizerBase]
) -> None:
    """apply_chat_template with to_jinja() writes exactly our text, and tokenizes it to exactly our
    segment-wise ids: inference prompts the model as it was trained."""
    tokenizer = data_tokenizers[family]
    info = TokenizerInfo(tokenizer)
    encoder = SegmentEncoder(tokenizer)
    jinja = chat_template_for(template, tokenizer)
    for messages in _message_lists():
        for generation in (False, True):
            ours = template.render(messages, bos=info.bos, eos=info.eos, add_generation_prompt=generation)
            theirs = tokenizer.apply_chat_template(
                messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation
            )
            assert theirs == "".join(s.text for s in ours)
            ids = tokenizer.apply_chat_template(
                messages, chat_template=jinja, add_generation_prompt=generation, return_dict=False
            )
            assert ids == [i for segment_ids in encoder.encode([ours])[0] for i in segment_ids]


def test_chat_template_has_bos_only_where_the_tokenizer_adds_it(
    data_tokenizers: dict[str, PreTrainedTokenizerBase],
) -> None:
    assert "bos_token" in chat_template_for(load_template(), data_tokenizers["bpe"])
    assert "bos_token" in chat_template_for(load_template(), data_tokenizers["spm"])
    assert "bos_token" not in chat_template_for(load_template(), data_tokenizers["bpe-nobos"])


def test_shipped_tokenizer_carries_the_default_chat_template(data_tokenizer: PreTrainedTokenizerBase) -> None:
    assert data_tokenizer.chat_template == load_template().to_jinja(add_bos=True)


def test_load_template_specs(tmp_path: Path) -> None:
    assert load_template(None) == PromptTemplate()
    assert load_template("alpaca").user_header == "### Instruction:\n"
    assert load_template({"system": "Hi."}) == dataclasses.replace(PromptTemplate(), system="Hi.")
    assert load_template({"base": "alpaca", "system": None}).system is None
    saved = save_template(ODD_TEMPLATE, tmp_path)
    assert saved == tmp_path / "prompt_template.json"
    assert load_template(saved) == ODD_TEMPLATE
    assert load_template(tmp_path) == ODD_TEMPLATE  # a pipeline dir / exported model dir
    assert PromptTemplate.from_dict(json.loads(json.dumps(ODD_TEMPLATE.to_dict()))) == ODD_TEMPLATE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("chatml", "template 'chatml' is neither a builtin template (default, alpaca) nor a JSON file"),
        (
            {"sytem": "x"},
            (
                'unknown template field "sytem"; known fields: base, assistant_header, input_format, name, '
                "reference_format, separator, system, system_header, user_header"
            ),
        ),
        ({"base": "vicuna"}, "template \"base\" 'vicuna' is not a builtin template (default, alpaca)"),
        (
            {"assistant_header": "Assistant: "},
            ("template field \"assistant_header\" must end with a newline, got 'Assistant: '"),
        ),
        (
            {"input_format": "{instruct} {inputs}"},
            (
                'template field "input_format" must contain {input} and {instruct} '
                "once each, got '{instruct} {inputs}'"
            ),
        ),
        ({"system": "  "}, 'template field "system" is empty: use null for no system line'),
        ({"user_header": 3}, 'template field "user_header" must be a string, got 3'),
    ],
)
def test_template_errors(spec: object, message: str) -> None:
    with pytest.raises(DataError) as err:
        load_template(spec)  # type: ignore[arg-type]
    assert str(err.value).startswith(message)
