"""`python -m data` preview/stats/build-tokenizer, and the shipped tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from data import IGNORE_INDEX, load_template
from data.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED = "tests/fixtures/seed_example.json"
TOKENIZER = "configs/tiny-llama"

# the trained runs of each seed sample: only the answers, each with its EOS (pretrain: all but BOS)
SEED_TRAINED = [
    [json.loads((REPO / SEED).read_text(encoding="utf-8"))[0]["text"] + "</s>"],
    ["再。。。再靠近点快被融化?</s>"],
    ["你要是没事干去村头把粪挑了</s>"],
    ["你好</s>", "今天星期三</s>", "傻逼，再问打死你</s>"],
    ["100个字</s>", "你不会自己看?</s>"],
]


def _trained_runs(record: dict, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    labels = np.array(record["labels"])
    trained = labels != IGNORE_INDEX
    cuts = np.flatnonzero(np.diff(trained.astype(int))) + 1
    return [
        tokenizer.decode(run.tolist())
        for run, keep in zip(np.split(labels, cuts), np.split(trained, cuts))
        if keep[0]
    ]


def test_preview_contract_on_the_seed_example(data_tokenizer: PreTrainedTokenizerBase) -> None:
    """The command line itself, offline: one JSON object per sample, only the answers trained."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "data",
            "preview",
            "--data",
            SEED,
            "--tokenizer",
            TOKENIZER,
            "--max-seq-len",
            "512",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == ["pretrain", "instruct", "instruct", "conversation", "ref_qa"]
    for record, expected in zip(records, SEED_TRAINED):
        assert len(record["input_ids"]) == len(record["labels"])
        assert all(label in (IGNORE_INDEX, i) for label, i in zip(record["labels"], record["input_ids"]))
        assert _trained_runs(record, data_tokenizer) == expected
        assert (record["truncated"], record["dropped"]) == (False, False)


def test_preview_truncation_and_drop(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preview", "--data", SEED, "--tokenizer", TOKENIZER, "--max-seq-len", "40"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["truncated"], r["dropped"]) for r in records] == [
        (True, False),
        (True, True),
        (True, True),
        (True, False),
        (True, True),
    ]
    assert all(len(r["input_ids"]) == 40 for r in records)


def test_preview_pretty_marks_the_trained_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "preview",
                "--data",
                SEED,
                "--tokenizer",
                TOKENIZER,
                "--max-seq-len",
                "512",
                "--pretty",
                "--system",
                "Be kind.",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "=== tests/fixtures/seed_example.json sample 1 (instruct): 75 tokens, 19 trained ===\n"
        "<s>### System:\nBe kind.\n\n### User:\n补充下面横线上的内容\n\nInput:\n再多看一眼就会爆炸，________\n\n"
        "### Assistant:\n[[再。。。再靠近点快被融化?</s>]]\n"
    ) in out


def test_preview_reports_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    bad = "tests/fixtures/bad/wrong_role.json"
    assert main(["preview", "--data", bad, "--tokenizer", TOKENIZER, "--max-seq-len", "64"]) == 2
    assert capsys.readouterr().err == (
        f'error: {bad}: sample 1: field "rounds"[2][0] must be "ask" or "ans", got "question"\n'
    )
    assert main(["preview", "--data", bad, "--tokenizer", TOKENIZER, "--max-seq-len", "64", "--lenient"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    assert captured.err.startswith("data: skipped 1 invalid samples (lenient): bad role 1\n")


def test_stats(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["stats", "--data", "data/samples", "--tokenizer", TOKENIZER, "--max-seq-len", "64", "--pack"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(
        "samples        53 in 5 files (pretrain 10, instruct 15, conversation 10, ref_qa 6, "
        "messages 12)\ninvalid        0 skipped (none)\ntruncated      "
    )
    assert "(packed)" in out and "length (tokens before truncation):" in out
    assert main(["stats", "--data", SEED, "--tokenizer", TOKENIZER, "--max-seq-len", "64", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["samples"], stats["truncated"], stats["dropped_no_trained"], stats["rows"]) == (5, 4, 2, 3)
    assert sum(stats["length_histogram"].values()) == 5 and stats["length_histogram"][">64"] == 4


def test_shipped_tokenizer(data_tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(data_tokenizer) <= 4096
    assert [data_tokenizer.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<pad>", "<s>", "</s>"]
    assert (data_tokenizer.pad_token_id, data_tokenizer.bos_token_id, data_tokenizer.eos_token_id) == (
        0,
        1,
        2,
    )
    assert data_tokenizer("Zorbia")["input_ids"][0] == 1  # adds BOS, like llama
    text = "佐比亚的首都是奎隆。 Zorbia's capital is Quillon 🙂"
    assert data_tokenizer.decode(data_tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert data_tokenizer.chat_template == load_template().to_jinja(add_bos=True)


def test_build_tokenizer_reproduces_the_shipped_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build-tokenizer", "--out", str(tmp_path)]) == 0
    assert "saved TokenizersBackend with" in capsys.readouterr().out
    shipped = REPO / TOKENIZER
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
