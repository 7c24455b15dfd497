"""The prompt template: role messages -> text segments marked trained or not, and the same as Jinja.

Every sample type becomes role messages first (`sample_messages`), then one template renders them.
The default format, for a tokenizer that adds BOS ("<s>") with EOS "</s>", is

    <s>### System:
    You are a helpful assistant.

    ### User:
    What is the capital of Zorbia?

    ### Assistant:
    Zorbia's capital is Quillon.</s>

    ### User:
    ...

The system block appears only when the sample has a system message or the template sets `system`.
Only each answer and the EOS after it are trained. Every boundary between a trained and an untrained
segment falls right after a newline (the assistant header ends with one) or right after a special
token (EOS, BOS), and message contents are stripped, so tokenizing segment by segment gives the same
ids as tokenizing the whole text (see data.encode). `to_jinja` writes the same format as a Hugging
Face chat_template, so `apply_chat_template` prompts a trained model exactly as it was trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from data.errors import DataError
from data.sample_types import Chat, Conversation, Instruct, Message, Pretrain, RefQA, Sample

TEMPLATE_FILENAME = "prompt_template.json"  # saved beside the model (pipeline dir, HF export)


class Segment(NamedTuple):
    """A piece of rendered text; `trained` marks the tokens whose labels are kept."""

    text: str
    trained: bool


@dataclass(frozen=True)
class PromptTemplate:
    """How role messages are written as text. All fields are plain strings, saved as JSON."""

    name: str = "default"
    """Informational name, kept in the saved template."""
    system: str | None = None
    """System line used when a sample has no system message of its own; None: no system block."""
    system_header: str = "### System:\n"
    user_header: str = "### User:\n"
    assistant_header: str = "### Assistant:\n"
    """Must end with a newline: the trained answer starts right after it."""
    separator: str = "\n\n"
    """Between consecutive messages (after the EOS of an answer too)."""
    input_format: str = "{instruct}\n\nInput:\n{input}"
    """User message of an instruct sample that has an input; without input it is the instruction alone."""
    reference_format: str = "Reference:\n{reference}\n\n{question}"
    """First user message of a ref_qa sample: the reference as context, then the first question."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str) and not (field.name == "system" and value is None):
                raise DataError(f'template field "{field.name}" must be a string, got {value!r}')
        if self.system is not None and not self.system.strip():
            raise DataError('template field "system" is empty: use null for no system line')
        if not self.assistant_header.endswith("\n"):
            raise DataError(
                f'template field "assistant_header" must end with a newline, got {self.assistant_header!r}: '
                "the trained answer starts right after it, and only a boundary after a newline tokenizes "
                "the same in pieces as in the whole text"
            )
        _check_format(self.input_format, "input_format", {"instruct", "input"})
        _check_format(self.reference_format, "reference_format", {"reference", "question"})

    def render(
        self,
        messages: Sequence[Message | Mapping[str, str]],
        *,
        bos: str = "",
        eos: str,
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """Messages -> segments. `bos`: the BOS text when the tokenizer adds one, else ""."""
        msgs = [_as_message(m) for m in messages]
        if self.system is not None and (not msgs or msgs[0].role != "system"):
            msgs.insert(0, Message("system", self.system))
        segments: list[Segment] = []
        prompt = bos
        for i, message in enumerate(msgs):
            prompt += self.separator if i else ""
            if message.role == "assistant":
                segments.append(Segment(prompt + self.assistant_header, False))
                segments.append(Segment(message.content.strip() + eos, True))
                prompt = ""
            else:
                prompt += self._header(message.role) + message.content.strip()
        if add_generation_prompt:
            prompt += (self.separator if msgs else "") + self.assistant_header
        if prompt:
            segments.append(Segment(prompt, False))
        return segments

    def render_text(
        self,
        messages: Sequence[Message | Mapping[str, str]],
        *,
        bos: str = "",
        eos: str,
        add_generation_prompt: bool = False,
    ) -> str:
        segments = self.render(messages, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt)
        return "".join(s.text for s in segments)

    def to_jinja(self, *, add_bos: bool = False) -> str:
        """The template as a Hugging Face chat_template; renders exactly the text of `render_text`.

        `add_bos`: start with `{{ bos_token }}`, for tokenizers that add BOS (llama; not bloom or
        qwen2). `data.encode.chat_template_for(template, tokenizer)` picks it for a tokenizer.
        """
        default_system = ""
        if self.system is not None:
            default_system = (
                "{%- if not msgs or msgs[0]['role'] != 'system' -%}\n"
                "    {%- set msgs = [{'role': 'system', 'content': "
                + _literal(self.system)
                + "}] + msgs -%}\n"
                "{%- endif -%}\n"
            )
        replacements = {
            "@BOS@": "{{- bos_token -}}\n" if add_bos else "",
            "@DEFAULT_SYSTEM@\n": default_system,
            "@SEPARATOR@": _literal(self.separator),
            "@SYSTEM@": _literal(self.system_header),
            "@USER@": _literal(self.user_header),
            "@ASSISTANT@": _literal(self.assistant_header),
        }
        text = _JINJA
        for key, value in replacements.items():
            text = text.replace(key, value)
        return text

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec: Mapping[str, object]) -> PromptTemplate:
        """Fields override a builtin template: `spec["base"]` (default "default")."""
        base_name = spec.get("base", "default")
        if base_name not in BUILTIN_TEMPLATES:
            raise DataError(f'template "base" {base_name!r} is not a builtin template ({_builtin_names()})')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known - {"base"})
        if unknown:
            raise DataError(
                f'unknown template field "{unknown[0]}"; known fields: base, {", ".join(sorted(known))}'
            )
        overrides = {k: v for k, v in spec.items() if k != "base"}
        return dataclasses.replace(BUILTIN_TEMPLATES[str(base_name)], **overrides)  # type: ignore[arg-type]

    def _header(self, role: str) -> str:
        if role == "system":
            return self.system_header
        if role == "user":
            return self.user_header
        raise DataError(f"unknown message role {role!r}: expected system, user or assistant")


# Tags use "-" on both sides so the newlines and indentation here never reach the output.
_JINJA = """\
@BOS@{%- set msgs = messages -%}
@DEFAULT_SYSTEM@
{%- for message in msgs -%}
    {%- if not loop.first -%}{{- @SEPARATOR@ -}}{%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- @SYSTEM@ + (message['content'] | trim) -}}
    {%- elif message['role'] == 'user' -%}
        {{- @USER@ + (message['content'] | trim) -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- @ASSISTANT@ + (message['content'] | trim) + eos_token -}}
    {%- else -%}
        {{- raise_exception('unknown message role: ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {%- if msgs -%}{{- @SEPARATOR@ -}}{%- endif -%}
    {{- @ASSISTANT@ -}}
{%- endif -%}"""

# What `load_template` and `DataSettings.template` accept.
TemplateSpec = PromptTemplate | Mapping[str, object] | str | os.PathLike[str] | None


def load_template(spec: TemplateSpec = None) -> PromptTemplate:
    """None: the default; a builtin name; a dict of fields; a JSON file, or a directory holding
    prompt_template.json (a pipeline dir or an exported model)."""
    if spec is None:
        return BUILTIN_TEMPLATES["default"]
    if isinstance(spec, PromptTemplate):
        return spec
    if isinstance(spec, Mapping):
        return PromptTemplate.from_dict(spec)
    if isinstance(spec, str) and spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / TEMPLATE_FILENAME
    if not path.is_file():
        raise DataError(
            f"template {str(spec)!r} is neither a builtin template ({_builtin_names()}) nor a JSON file"
        )
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"broken JSON in {path} at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(fields, dict):
        raise DataError(f"{path}: a template file must hold a JSON object of template fields")
    return PromptTemplate.from_dict(fields)


def save_template(template: PromptTemplate, directory: str | os.PathLike[str]) -> Path:
    """Write `prompt_template.json` into `directory` (which must exist); returns the file path."""
    path = Path(directory) / TEMPLATE_FILENAME
    path.write_text(json.dumps(template.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def sample_messages(
    sample: Instruct | Conversation | RefQA | Chat, template: PromptTemplate
) -> list[Message]:
    """A validated non-pretrain sample as role messages."""
    if isinstance(sample, Instruct):
        user = sample.instruct
        if sample.input is not None:
            user = template.input_format.format(instruct=sample.instruct, input=sample.input)
        return [Message("user", user), Message("assistant", sample.output)]
    if isinstance(sample, Conversation):
        return list(sample.turns)
    if isinstance(sample, RefQA):
        # validation guarantees turns[0] is the first question; the reference joins it as context
        first = template.reference_format.format(reference=sample.reference, question=sample.turns[0].content)
        return [Message("user", first), *sample.turns[1:]]
    return list(sample.messages)


def sample_segments(
    sample: Sample, template: PromptTemplate, *, bos: str, eos: str, train_on_prompt: bool = False
) -> list[Segment]:
    """Render a sample; neighbouring segments with the same flag are merged (fewer boundaries)."""
    if isinstance(sample, Pretrain):
        # pretraining text is trained whole, untouched (leading spaces may matter, e.g. code)
        segments = [Segment(bos, False), Segment(sample.text + eos, True)]
    else:
        segments = template.render(sample_messages(sample, template), bos=bos, eos=eos)
    if train_on_prompt:
        return [Segment("".join(s.text for s in segments), True)]
    merged: list[Segment] = []
    for segment in segments:
        if not segment.text:
            continue
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged


def _as_message(message: Message | Mapping[str, str]) -> Message:
    if isinstance(message, Message):
        return message
    return Message(message["role"], message["content"])  # type: ignore[arg-type]


def _check_format(fmt: str, field: str, expected: set[str]) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as err:
        raise DataError(f'template field "{field}" {fmt!r} is not a valid format string: {err}') from err
    if sorted(names) != sorted(expected):
        wanted = " and ".join(f"{{{n}}}" for n in sorted(expected))
        raise DataError(f'template field "{field}" must contain {wanted} once each, got {fmt!r}')


def _literal(text: str) -> str:
    """A Jinja string literal for `text`. Jinja decodes literals with Python's unicode-escape rules,
    after turning non-ASCII characters into escapes, so only backslash, quote and control
    characters need escaping here."""
    out = []
    for ch in text:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def _builtin_names() -> str:
    return ", ".join(BUILTIN_TEMPLATES)


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "default": PromptTemplate(),
    # The Alpaca prompt (the seed's inference example); multi-turn samples repeat the blocks.
    "alpaca": PromptTemplate(
        name="alpaca",
        system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
        system_header="",
        user_header="### Instruction:\n",
        assistant_header="### Response:\n",
        input_format="{instruct}\n\n### Input:\n{input}",
    ),
}
