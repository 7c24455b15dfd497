"""Readers and validation: formats, folders, weights, and the bad-input corpus with its messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from data import DataError, DataSettings, load_rows
from data.readers import Source, parse_sources, read_records, source_files, weighted_indices
from data.sample_types import parse_sample

REPO = Path(__file__).resolve().parents[1]
BAD = Path("tests/fixtures/bad")  # relative, as a user would type it: messages show it as given

# one line of bad_samples.jsonl each, in order: (reason counted in lenient mode, message)
BAD_SAMPLES = [
    (
        "unknown type",
        (
            'sample 0 (line 1): unknown type "dialog"; expected one of pretrain, instruct, conversation, '
            "ref_qa, messages"
        ),
    ),
    (
        "missing field",
        (
            'sample 1 (line 2): missing field "type" (one of pretrain, instruct, conversation, ref_qa, '
            "messages)"
        ),
    ),
    ("empty field", 'sample 2 (line 3): field "text" is empty'),
    ("wrong type", 'sample 3 (line 4): field "text" must be a string, got number 42'),
    ("empty field", 'sample 4 (line 5): field "input" is empty: leave the field out when there is no input'),
    ("missing field", 'sample 5 (line 6): missing field "output" (required for type "instruct")'),
    (
        "unknown field",
        (
            'sample 6 (line 7): unknown field "inptu" for type "instruct" (allowed: "input", "instruct", '
            '"output", plus "id" and "meta")'
        ),
    ),
    ("no answer", 'sample 7 (line 8): field "rounds" has no "ans": nothing would be trained'),
    ("bad role", 'sample 8 (line 9): field "rounds"[1][0] must be "ask" or "ans", got "question"'),
    ("empty field", 'sample 9 (line 10): field "rounds"[1][1] is empty'),
    (
        "wrong type",
        (
            'sample 10 (line 11): field "rounds" must be a non-empty list of ["ask" | "ans", text] pairs, '
            'got "hi"'
        ),
    ),
    ("bad order", 'sample 11 (line 12): field "rounds" must start with an "ask": an answer needs a question'),
    (
        "wrong type",
        (
            'sample 12 (line 13): field "rounds"[0] must be a pair ["ask" | "ans", text], '
            'got array ["ask", "hi", "extra"]'
        ),
    ),
    ("missing field", 'sample 13 (line 14): missing field "reference" (required for type "ref_qa")'),
    ("empty field", 'sample 14 (line 15): field "reference" is empty'),
    (
        "bad role",
        (
            'sample 15 (line 16): field "messages"[1]["role"] must be "system", "user" or "assistant", '
            'got "bot"'
        ),
    ),
    (
        "no answer",
        'sample 16 (line 17): field "messages" has no "assistant" message: nothing would be trained',
    ),
    ("wrong type", 'sample 17 (line 18): field "messages"[1]["content"] must be a string, got array ["x"]'),
    (
        "bad order",
        'sample 18 (line 19): field "messages"[1] is a system message; only the first message may be one',
    ),
    (
        "empty field",
        (
            'sample 19 (line 20): field "messages" must be a non-empty list of {"role", "content"} '
            "objects, got array []"
        ),
    ),
    ("wrong type", "sample 20 (line 21): a sample must be a JSON object, got array [1, 2]"),
]


def test_bad_samples_each_with_its_message() -> None:
    path = BAD / "bad_samples.jsonl"
    records = list(read_records(path))
    assert len(records) == len(BAD_SAMPLES) + 1  # the last line is valid
    for record, (reason, message) in zip(records, BAD_SAMPLES):
        with pytest.raises(DataError) as err:
            parse_sample(record.value, record.where)
        assert str(err.value) == f"{path}: {message}"
        assert err.value.reason == reason
    parse_sample(records[-1].value, records[-1].where)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "missing_comma.json",
            (
                "broken JSON in tests/fixtures/bad/missing_comma.json at line 4, column 25: "
                "Expecting ',' delimiter"
            ),
        ),
        (
            "trailing_comma.json",
            (
                "broken JSON in tests/fixtures/bad/trailing_comma.json at line 4, column 1: "
                "Expecting value (JSON allows no comma before ] or }: remove the trailing comma)"
            ),
        ),
        (
            "seed_commented.json",
            (
                "broken JSON in tests/fixtures/bad/seed_commented.json at line 2, column 5: "
                "Expecting value (JSON has no comments: remove them)"
            ),
        ),
        (
            "broken_line.jsonl",
            (
                "broken JSON in tests/fixtures/bad/broken_line.jsonl at line 2, column 38: "
                "Expecting ',' delimiter"
            ),
        ),
        (
            "object.json",
            (
                "broken JSON in tests/fixtures/bad/object.json at line 1, column 2: Expecting property name "
                "enclosed in double quotes (the file does not start with '[', so it is read as JSON Lines: "
                "one sample object per line)"
            ),
        ),
        (
            "not_utf8.jsonl",
            "tests/fixtures/bad/not_utf8.jsonl: not UTF-8 text at line 1; save the file as UTF-8",
        ),
        (
            "empty.json",
            (
                "tests/fixtures/bad/empty.json: the file is empty; "
                "it must hold a JSON array or JSON Lines of samples"
            ),
        ),
    ],
)
def test_unreadable_files(name: str, message: str, data_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(DataError) as err:
        load_rows(DataSettings(paths=str(BAD / name), max_seq_len=64), data_tokenizer)
    assert str(err.value) == message


def test_strict_mode_fails_on_the_first_bad_sample(data_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(DataError) as err:
        load_rows(DataSettings(paths=str(BAD / "wrong_role.json"), max_seq_len=64), data_tokenizer)
    assert str(err.value) == (
        'tests/fixtures/bad/wrong_role.json: sample 1: field "rounds"[2][0] must be "ask" or '
        '"ans", got "question"'
    )


def test_lenient_mode_skips_and_counts(
    data_tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [str(BAD / "bad_samples.jsonl"), str(BAD / "broken_line.jsonl")]
    rows = load_rows(DataSettings(paths=paths, max_seq_len=64, lenient=True), data_tokenizer)
    assert rows.stats["skipped_invalid"] == {
        "bad order": 2,
        "bad role": 2,
        "broken JSON": 1,
        "empty field": 5,
        "missing field": 3,
        "no answer": 2,
        "unknown field": 1,
        "unknown type": 1,
        "wrong type": 5,
    }
    # the valid samples remain, with their indices in their files (a broken line still counts)
    assert [rows.row_samples(i) for i in range(len(rows))] == [
        [(paths[0], 21)],
        [(paths[1], 0)],
        [(paths[1], 2)],
    ]
    assert "data: skipped 22 invalid samples (lenient): bad order 2, bad role 2, broken JSON 1" in caplog.text
    assert (
        "data:   first unknown type: tests/fixtures/bad/bad_samples.jsonl: sample 0 (line 1): unknown type"
        in caplog.text
    )


def test_broken_json_array_fails_even_when_lenient(data_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(DataError, match="broken JSON in tests/fixtures/bad/missing_comma.json at line 4"):
        load_rows(
            DataSettings(paths=str(BAD / "missing_comma.json"), max_seq_len=64, lenient=True), data_tokenizer
        )


def test_json_array_jsonl_and_folders(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = {"type": "instruct", "instruct": "Hi", "output": "Hello."}
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.json").write_text(json.dumps([sample, sample]), encoding="utf-8")
    (tmp_path / "sub" / "a.jsonl").write_text(
        json.dumps(sample) + "\n\n" + json.dumps(sample) + "\n", encoding="utf-8"
    )
    (tmp_path / ".hidden" / "x.json").write_text("not json", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a sample file", encoding="utf-8")
    rows = load_rows(DataSettings(paths=str(tmp_path), max_seq_len=64), data_tokenizer)
    a, b = str(tmp_path / "sub" / "a.jsonl"), str(tmp_path / "b.json")
    assert [rows.row_samples(i) for i in range(len(rows))] == [[(b, 0)], [(b, 1)], [(a, 0)], [(a, 1)]]


def test_weights(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    samples = [{"type": "instruct", "instruct": f"Q{i}", "output": f"A{i}"} for i in range(10)]
    (tmp_path / "x.json").write_text(json.dumps(samples), encoding="utf-8")
    (tmp_path / "y.json").write_text(json.dumps(samples[:2]), encoding="utf-8")
    x, y = str(tmp_path / "x.json"), str(tmp_path / "y.json")

    def used(paths: object, seed: int = 42) -> list[tuple[str, int]]:
        rows = load_rows(DataSettings(paths=paths, max_seq_len=64, seed=seed), data_tokenizer)
        return [s for i in range(len(rows)) for s in rows.row_samples(i)]

    assert used([{"path": y, "weight": 2.0}]) == [(y, 0), (y, 1), (y, 0), (y, 1)]
    half = used([{"path": x, "weight": 0.5}, y])
    assert len(half) == 5 + 2 and len(set(half[:5])) == 5 and half[5:] == [(y, 0), (y, 1)]
    assert half == used([{"path": x, "weight": 0.5}, y])  # seeded: the same half every time
    assert half != used([{"path": x, "weight": 0.5}, y], seed=1)
    assert len(used([{"path": x, "weight": 1.5}])) == 15


def test_weighted_indices() -> None:
    rng = np.random.default_rng(0)
    assert weighted_indices(3, 2.0, rng).tolist() == [0, 1, 2, 0, 1, 2]
    picked = weighted_indices(10, 0.3, rng)
    assert len(picked) == 3 and len(set(picked.tolist())) == 3


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ([], "the data paths are empty: give a file, a folder or a list of them"),
        ("no/such/dir", "no/such/dir: no such file or folder (relative paths start at "),
        (
            [{"path": "x.json", "weight": 0}],
            (
                'data path entry 0 (x.json): "weight" must be a number > 0, got 0 '
                "(2.0 uses each sample twice per epoch, 0.5 a seeded half; leave the entry "
                "out to skip the source)"
            ),
        ),
        (
            [{"file": "x.json"}],
            'data path entry 0: expected keys "path" and optional "weight", got [\'file\']',
        ),
        ([3], 'data path entry 0: expected a path or {"path": ..., "weight": ...}, got int'),
    ],
)
def test_bad_paths(paths: object, message: str) -> None:
    with pytest.raises(DataError) as err:
        for source in parse_sources(paths):  # type: ignore[arg-type]
            source_files(source)
    assert str(err.value).startswith(message)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the folder holds no .json or .jsonl sample files"):
        source_files(Source(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_seq_len": 1}, "max_seq_len must be an integer >= 2, got 1"),
        ({"max_seq_len": 8, "pack": "yes"}, "pack must be true or false, got 'yes'"),
        ({"max_seq_len": 8, "seed": 1.5}, "seed must be an integer, got 1.5"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError) as err:
        DataSettings(paths=str(REPO / "data" / "samples"), **kwargs)
    assert str(err.value) == message
