"""The five sample types, validated from raw JSON values into typed samples.

    pretrain      {"text": str}
    instruct      {"instruct": str, "input"?: str, "output": str}
    conversation  {"rounds": [["ask" | "ans", str], ...]}   consecutive asks allowed, >= 1 ans
    ref_qa        {"reference": str, "rounds": [...]}        the reference is context, never trained
    messages      {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Every sample also carries "type"; "id" and "meta" are allowed and ignored. Strings must be
non-empty after stripping whitespace. A violation raises `DataError` naming the sample and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from data.errors import DataError

Role = Literal["system", "user", "assistant"]
SAMPLE_TYPES = ("pretrain", "instruct", "conversation", "ref_qa", "messages")
_IGNORED_KEYS = frozenset({"type", "id", "meta"})
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {  # type -> (required, optional)
    "pretrain": (frozenset({"text"}), frozenset()),
    "instruct": (frozenset({"instruct", "output"}), frozenset({"input"})),
    "conversation": (frozenset({"rounds"}), frozenset()),
    "ref_qa": (frozenset({"reference", "rounds"}), frozenset()),
    "messages": (frozenset({"messages"}), frozenset()),
}
_ROUND_ROLES: dict[str, Role] = {"ask": "user", "ans": "assistant"}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Pretrain:
    text: str


@dataclass(frozen=True)
class Instruct:
    instruct: str
    output: str
    input: str | None = None


@dataclass(frozen=True)
class Conversation:
    """Also the validated form of ref_qa's rounds: ask -> user, ans -> assistant."""

    turns: tuple[Message, ...]


@dataclass(frozen=True)
class RefQA:
    reference: str
    turns: tuple[Message, ...]


@dataclass(frozen=True)
class Chat:
    messages: tuple[Message, ...]


Sample = Pretrain | Instruct | Conversation | RefQA | Chat


def parse_sample(value: object, where: str) -> tuple[str, Sample]:
    """Validate one raw JSON value; returns (type name, typed sample). `where` prefixes errors."""
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: a sample must be a JSON object, got {_describe(value)}", reason="wrong type"
        )
    kind = _sample_type(value, where)
    _check_keys(value, kind, where)
    if kind == "pretrain":
        return kind, Pretrain(_text(value, "text", where, strip=False))
    if kind == "instruct":
        has_input = "input" in value
        return kind, Instruct(
            instruct=_text(value, "instruct", where),
            output=_text(value, "output", where),
            input=_text(value, "input", where) if has_input else None,
        )
    if kind == "messages":
        return kind, Chat(_messages(value, where))
    turns = _rounds(value, where)
    if kind == "conversation":
        return kind, Conversation(turns)
    return kind, RefQA(_text(value, "reference", where), turns)


def _sample_type(value: dict[str, object], where: str) -> str:
    if "type" not in value:
        raise DataError(
            f'{where}: missing field "type" (one of {", ".join(SAMPLE_TYPES)})', reason="missing field"
        )
    kind = value["type"]
    if kind not in SAMPLE_TYPES:
        raise DataError(
            f"{where}: unknown type {_describe(kind)}; expected one of {', '.join(SAMPLE_TYPES)}",
            reason="unknown type",
        )
    return str(kind)


def _check_keys(value: dict[str, object], kind: str, where: str) -> None:
    required, optional = _FIELDS[kind]
    for key in sorted(required):
        if key not in value:
            raise DataError(
                f'{where}: missing field "{key}" (required for type "{kind}")', reason="missing field"
            )
    unknown = sorted(set(value) - required - optional - _IGNORED_KEYS)
    if unknown:
        allowed = ", ".join(f'"{k}"' for k in sorted(required | optional))
        raise DataError(
            f'{where}: unknown field "{unknown[0]}" for type "{kind}" '
            f'(allowed: {allowed}, plus "id" and "meta")',
            reason="unknown field",
        )


def _text(
    obj: dict[str, object], key: str, where: str, *, label: str | None = None, strip: bool = True
) -> str:
    """A required non-empty string field; stripped unless the text is pretraining text."""
    field = label or f'"{key}"'
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field} must be a string, got {_describe(value)}", reason="wrong type"
        )
    stripped = value.strip()
    if not stripped:
        fix = ": leave the field out when there is no input" if key == "input" and label is None else ""
        raise DataError(f"{where}: field {field} is empty{fix}", reason="empty field")
    return stripped if strip else value


def _rounds(value: dict[str, object], where: str) -> tuple[Message, ...]:
    rounds = value["rounds"]
    if not isinstance(rounds, list) or not rounds:
        raise DataError(
            f'{where}: field "rounds" must be a non-empty list of ["ask" | "ans", text] pairs, '
            f"got {_describe(rounds)}",
            reason="wrong type" if not isinstance(rounds, list) else "empty field",
        )
    turns = tuple(_round(r, i, where) for i, r in enumerate(rounds))
    _check_turn_order(turns, '"rounds"', where)
    return turns


def _round(item: object, i: int, where: str) -> Message:
    if not isinstance(item, list) or len(item) != 2:
        raise DataError(
            f'{where}: field "rounds"[{i}] must be a pair ["ask" | "ans", text], got {_describe(item)}',
            reason="wrong type",
        )
    role = item[0]
    if role not in _ROUND_ROLES:
        raise DataError(
            f'{where}: field "rounds"[{i}][0] must be "ask" or "ans", got {_describe(role)}',
            reason="bad role",
        )
    content = _text({"text": item[1]}, "text", where, label=f'"rounds"[{i}][1]')
    return Message(_ROUND_ROLES[str(role)], content)


def _messages(value: dict[str, object], where: str) -> tuple[Message, ...]:
    items = value["messages"]
    if not isinstance(items, list) or not items:
        raise DataError(
            f'{where}: field "messages" must be a non-empty list of {{"role", "content"}} objects, '
            f"got {_describe(items)}",
            reason="wrong type" if not isinstance(items, list) else "empty field",
        )
    messages = tuple(_message(m, i, where) for i, m in enumerate(items))
    for i, message in enumerate(messages[1:], start=1):
        if message.role == "system":
            raise DataError(
                f'{where}: field "messages"[{i}] is a system message; only the first message may be one',
                reason="bad order",
            )
    _check_turn_order(messages, '"messages"', where)
    return messages


def _message(item: object, i: int, where: str) -> Message:
    label = f'"messages"[{i}]'
    if not isinstance(item, dict) or set(item) != {"role", "content"}:
        raise DataError(
            f'{where}: field {label} must be an object with exactly "role" and "content", '
            f"got {_describe(item)}",
            reason="wrong type",
        )
    role = item["role"]
    if role not in ("system", "user", "assistant"):
        raise DataError(
            f'{where}: field {label}["role"] must be "system", "user" or "assistant", got {_describe(role)}',
            reason="bad role",
        )
    return Message(role, _text(item, "content", where, label=f'{label}["content"]'))  # type: ignore[arg-type]


def _check_turn_order(turns: tuple[Message, ...], field: str, where: str) -> None:
    """The dialogue must open with the user (after an optional system message) and answer at least once."""
    dialogue = [t for t in turns if t.role != "system"]
    if not dialogue or dialogue[0].role != "user":
        first = 'an "ask"' if field == '"rounds"' else 'a "user" message (after an optional system message)'
        raise DataError(
            f"{where}: field {field} must start with {first}: an answer needs a question", reason="bad order"
        )
    if not any(t.role == "assistant" for t in dialogue):
        answer = '"ans"' if field == '"rounds"' else '"assistant" message'
        raise DataError(
            f"{where}: field {field} has no {answer}: nothing would be trained", reason="no answer"
        )


def _describe(value: object) -> str:
    """A short JSON rendering of a bad value for error messages: "question", number 3, array [1]."""
    text = json.dumps(value, ensure_ascii=False)
    text = text if len(text) <= 60 else text[:57] + "..."
    kinds = {dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
    return f"{kinds[type(value)]} {text}" if type(value) in kinds else text
