"""The stage split: explicit `parts` validation and the balanced "auto" split (pure functions)."""

from __future__ import annotations

import itertools
import random

import pytest

from models.partition import PartitionError, balanced_parts, resolve_parts, stage_bounds, validate_parts


def test_seed_example_bloom_7b() -> None:
    """bloom-7b: 30 blocks -> 32 layers; the seed's split puts the embedding and head alone."""
    parts = [1, 5, 5, 5, 5, 5, 5, 1]
    assert validate_parts(parts, num_layers=32, num_stages=8) == parts
    assert stage_bounds(parts) == [0, 1, 6, 11, 16, 21, 26, 31, 32]


@pytest.mark.parametrize("parts, stages, message", [
    ([1, 5, 5, 5, 5, 5, 5, 2], 8, r"sums to 33 but the model has 32 pipeline layers.*sum to 32"),
    ([1, 5, 5, 5, 5, 5, 6], 8, r"has 7 entries .* but the pipeline has 8 stages"),
    ([0, 6, 5, 5, 5, 5, 5, 1], 8, r"leaves stage\(s\) \[0\] without layers"),
    ([1, 5, 5.5, 5, 5, 5, 5, 0.5], 8, r"must be a list of integers"),
])
def test_bad_parts_say_value_rule_and_fix(parts: list, stages: int, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        validate_parts(parts, num_layers=32, num_stages=stages)


def test_unknown_parts_string() -> None:
    with pytest.raises(PartitionError, match=r"list of layer counts or \"auto\", got 'balanced'"):
        resolve_parts("balanced", costs=[1.0] * 4, num_stages=2)


def test_more_stages_than_layers() -> None:
    with pytest.raises(PartitionError, match="cannot split 4 layers into 5 pipeline stages"):
        balanced_parts([1.0] * 4, 5)


def brute_force_best(costs: list[float], stages: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_balanced_split_is_optimal_and_never_empty() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([0.01, 0.5, 1.0, 2.5]) for _ in range(n)]
        parts = balanced_parts(costs, stages)
        assert len(parts) == stages and min(parts) >= 1 and sum(parts) == n
        bounds = stage_bounds(parts)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert worst == pytest.approx(brute_force_best(costs, stages))


def test_auto_for_llama_7b_on_8_stages() -> None:
    """32 blocks, a near-free embedding and a head worth ~0.65 block: 4 blocks per stage."""
    parts = resolve_parts("auto", costs=[0.001, *[1.0] * 32, 0.65], num_stages=8)
    assert parts == [5, 4, 4, 4, 4, 4, 4, 5]
