"""Splitting the pipeline's layers into stages: pure functions, no torch, no DeepSpeed.

Layer order is a contract: layer 0 is the embedding, 1..N the decoder blocks, N+1 the final
norm + LM head. A split is given as ``parts``: how many consecutive layers each stage holds
(the seed's ``[1, 5, 5, 5, 5, 5, 5, 1]`` for bloom-7b's 32 layers on 8 stages).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PartitionError(ValueError):
    """A ``parts`` list or topology that cannot work; the message says how to fix it."""


def validate_parts(parts: Sequence[int], *, num_layers: int, num_stages: int) -> list[int]:
    """Check an explicit ``parts`` list against the model and the pipeline size."""
    parts = list(parts)
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        raise PartitionError(f"model_topo.parts must be a list of integers or \"auto\", got {parts!r}")
    if len(parts) != num_stages:
        raise PartitionError(
            f"model_topo.parts has {len(parts)} entries {parts} but the pipeline has {num_stages} stages "
            f"(process_topology dims[pipe]); give one layer count per stage, or \"auto\"")
    empty = [i for i, p in enumerate(parts) if p < 1]
    if empty:
        raise PartitionError(
            f"model_topo.parts {parts} leaves stage(s) {empty} without layers; every stage needs at "
            f"least one layer: use fewer pipeline stages or move layers to them")
    if sum(parts) != num_layers:
        raise PartitionError(
            f"model_topo.parts {parts} sums to {sum(parts)} but the model has {num_layers} pipeline "
            f"layers (embedding + {num_layers - 2} blocks + head); make the counts sum to {num_layers}, "
            f"or use \"auto\"")
    return parts


def balanced_parts(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty stages minimising the
    largest stage cost (the pipeline runs at the pace of its slowest stage).

    Exact dynamic programme, vectorised over the split point: O(stages * layers) numpy calls.
    """
    n = len(costs)
    if num_stages < 1:
        raise PartitionError(f"the pipeline needs at least 1 stage, got {num_stages}")
    if n < num_stages:
        raise PartitionError(
            f"cannot split {n} layers into {num_stages} pipeline stages (each stage needs a layer); "
            f"use at most {n} stages")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    # best[j, i]: smallest possible max stage cost putting the first i layers on j stages.
    best = np.full((num_stages + 1, n + 1), np.inf)
    arg = np.zeros((num_stages + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for j in range(1, num_stages + 1):
        for i in range(j, n - (num_stages - j) + 1):
            k = np.arange(j - 1, i)  # the previous stages end at k; stage j holds k..i-1
            cand = np.maximum(best[j - 1, k], prefix[i] - prefix[k])
            # ties: prefer the latest split point, which keeps early stages lighter (stage 0
            # also holds the embedding's optimizer state and the first micro-batch's warm-up).
            pick = len(cand) - 1 - int(np.argmin(cand[::-1]))
            best[j, i], arg[j, i] = cand[pick], k[pick]
    bounds = [n]
    for j in range(num_stages, 0, -1):
        bounds.append(int(arg[j, bounds[-1]]))
    bounds.reverse()
    return [bounds[s + 1] - bounds[s] for s in range(num_stages)]


def stage_bounds(parts: Sequence[int]) -> list[int]:
    """``[1, 2, 1] -> [0, 1, 3, 4]``: stage s holds layers ``bounds[s] .. bounds[s+1]-1``."""
    return [0, *np.cumsum(list(parts)).tolist()]


def resolve_parts(spec: Sequence[int] | str, *, costs: Sequence[float], num_stages: int) -> list[int]:
    """``spec`` is an explicit list or ``"auto"`` (balanced by ``costs``, one per layer)."""
    if isinstance(spec, str):
        if spec != "auto":
            raise PartitionError(f"model_topo.parts must be a list of layer counts or \"auto\", got {spec!r}")
        return balanced_parts(costs, num_stages)
    return validate_parts(spec, num_layers=len(costs), num_stages=num_stages)
