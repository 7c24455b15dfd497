"""Fast checks of the benchmark helpers (no DeepSpeed launches): the bench modules import, their
pure pieces compute what the docs say, and one in-process step of the single-stage runner trains."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common, pipe_scaling, pipe_vs_zero3
from models import common


def test_random_rows_are_shifted_pretrain_rows() -> None:
    rows = _common.random_rows(3, 16, vocab=50, seed=0)
    assert rows.input_ids.shape == (3, 16) and rows.input_ids.dtype == np.int32
    np.testing.assert_array_equal(rows.targets[:, :-1], rows.input_ids[:, 1:])
    assert (rows.targets[:, -1] == common.IGNORE_INDEX).all() and (rows.n_trained == 15).all()


def test_param_count_matches_transformers() -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_common.llama_config("tiny"))
    assert _common.param_count("tiny") == sum(p.numel() for p in model.parameters())


def test_longest_under_reads_a_fitted_curve() -> None:
    points = [(256, 100.0), (512, 200.0), (1024, 400.0)]  # linear: 100 per 256 tokens
    assert pipe_vs_zero3.longest_under(points, 300.0) == "768"
    assert pipe_vs_zero3.longest_under(points, 800.0) == "~2048"
    assert pipe_vs_zero3.longest_under(points, 50.0) == "< 256"


def test_summary_ratio_and_loss_check() -> None:
    result = {"job": {"global_rows": 8, "seq_len": 4}, "step_s": {"pipe": [1.0, 1.0], "zero3": [2.0, 1.0]},
              "losses": {"pipe": [5.0, 4.0], "zero3": [5.0, 4.1]}}
    summary = pipe_vs_zero3.summarize(result)
    assert summary["pipe/zero3"]["ratio"] == pytest.approx(1.5)
    assert summary["arms"]["pipe"]["tokens_per_s"] == pytest.approx(32.0)
    result["losses"]["zero3"][0] = 5.1
    with pytest.raises(RuntimeError, match="first-step losses differ"):
        pipe_vs_zero3.summarize(result)


def test_scaling_jobs_share_one_engine_per_topology() -> None:
    job = pipe_scaling.job_a([1, 2, 4], seq=8, warmup=1, steps=1, model="tiny")
    names = [r["name"] for r in job["runners"]]
    assert names == ["single-M1", "single-M2", "single-M4", "pp2-M1", "pp2-M2", "pp2-M4", "dp2-M2", "dp2-M4"]
    assert {r["share"] for r in job["runners"] if r["kind"] == "pipe" and r["pipe"] == 2} == {"pp2-M1"}


def test_svg_plot_is_well_formed() -> None:
    import xml.etree.ElementTree as ET

    svg = _common.svg_lines({"a": [(1, 2.0), (2, 3.0)], "b": [(1, 1.0), (2, 1.5)]}, title="t", xlabel="x",
                            ylabel="y", log2_x=True)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_single_runner_trains_in_process() -> None:
    from bench.workers.arms import SingleRunner

    job = {"model": "tiny", "seq_len": 16, "global_rows": 2, "seed": 0}
    rows = _common.random_rows(4, 16, vocab=512, seed=0)
    runner = SingleRunner({"name": "single", "micro": 1}, job, rows, None, None)
    first, second = runner.step(0), runner.step(0)
    assert np.isfinite(first) and second < first  # the same rows again: the step lowered their loss
