"""`make quickstart` end to end: the tiny default is built, converted, trained with a 2-stage
pipeline on the shipped samples, exported, and answers a question from them correctly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
def test_quickstart_trains_a_model_that_answers(tmp_path: Path) -> None:
    run = tmp_path / "quickstart"
    done = subprocess.run(["make", "--no-print-directory", "quickstart", f"RUN={run}"], cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer = json.loads((run / "answer.jsonl").read_text().splitlines()[-1])["text"]
    assert "Quillon" in answer
    assert "quickstart OK" in done.stdout
    metrics = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.25 * metrics[0]["loss"]  # it learned the samples
