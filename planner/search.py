"""Choosing a split and a topology: which `parts` fit, which balance compute, how few GPUs do.

Every function takes a StageModel, whose stage memory is O(1) per (stage, layer range), so the
searches below are exact over all contiguous splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models.partition import PartitionError, stage_bounds
from planner.memory import GIB, StageMemory, StageModel


@dataclass(frozen=True)
class Layout:
    """pipe x data GPUs and the layers per stage."""

    pipe: int
    data: int
    parts: list[int]

    @property
    def gpus(self) -> int:
        return self.pipe * self.data


def check_pipe(model: StageModel, pipe: int) -> None:
    if pipe < 1:
        raise PartitionError(f"the pipeline needs at least 1 stage, got {pipe}")
    if pipe > model.n:
        raise PartitionError(f"cannot split {model.n} layers into {pipe} pipeline stages (each stage needs a "
                             f"layer); use at most {model.n} stages")


def stages(model: StageModel, layout: Layout) -> list[StageMemory]:
    bounds = stage_bounds(layout.parts)
    return [model.stage(s, bounds[s], bounds[s + 1], pipe=layout.pipe, data=layout.data)
            for s in range(layout.pipe)]


def cap_bytes(model: StageModel) -> int:
    return int(model.opt.gpu_mem_gib * GIB)


def greedy_parts(model: StageModel, pipe: int, data: int, cap: int) -> list[int] | None:
    """A split of exactly `pipe` stages with every stage <= cap bytes, or None if none exists.

    Each stage takes as many layers as fit, leaving one per later stage. A stage's memory grows
    with its layers, and the same layers need no more on a later middle stage (fewer micro-batches
    in flight), so by induction each greedy stage ends no earlier than in any fitting split: the
    greedy split exists whenever one does (tests check this against brute force).
    """
    parts, a = [], 0
    for s in range(pipe):
        limit = model.n - (pipe - s - 1)
        if s == pipe - 1:
            b = limit if model.total(s, a, limit, pipe=pipe, data=data) <= cap else a
        else:
            b = a
            while b < limit and model.total(s, a, b + 1, pipe=pipe, data=data) <= cap:
                b += 1
        if b == a:
            return None
        parts.append(b - a)
        a = b
    return parts


def min_peak_parts(model: StageModel, pipe: int, data: int) -> list[int]:
    """The split whose largest stage memory is smallest (bisection on the cap, 1 MiB steps)."""
    check_pipe(model, pipe)
    low, high = 0, 1 << 50
    while high - low > 2**20:
        mid = (low + high) // 2
        if greedy_parts(model, pipe, data, mid) is None:
            low = mid
        else:
            high = mid
    parts = greedy_parts(model, pipe, data, high)
    assert parts is not None
    return parts


def balanced_fitting_parts(model: StageModel, pipe: int, data: int) -> list[int] | None:
    """Among the splits where every stage fits, those whose slowest stage computes least; of
    these, the one with the lowest memory peak. None when no split fits.

    (models.partition.balanced_parts is the first step without a memory cap; it breaks ties by
    position, this by memory.)
    """
    check_pipe(model, pipe)
    cap = cap_bytes(model)
    if greedy_parts(model, pipe, data, cap) is None:
        return None
    total = sum(layer.compute for layer in model.profile.layers) or 1.0
    # integer compute units, so that equal stages tie exactly and memory decides between them
    prefix = [0]
    for layer in model.profile.layers:
        prefix.append(prefix[-1] + round(layer.compute / total * 10**12))

    def compute(j: int, k: int, i: int) -> int:
        return prefix[i] - prefix[k]

    slowest, _ = _bottleneck_split(model, pipe, data, cap, compute, None)
    _, parts = _bottleneck_split(model, pipe, data, cap, lambda j, k, i: model.total(j, k, i, pipe=pipe, data=data),
                                 lambda k, i: compute(0, k, i) <= slowest)
    return parts


def _bottleneck_split(model: StageModel, pipe: int, data: int, cap: int, value: Callable[[int, int, int], int],
                      allowed: Callable[[int, int], bool] | None) -> tuple[int, list[int]]:
    """Exact DP over contiguous splits: the smallest possible max over stages of value(stage,
    first, end), every stage within `cap` bytes (and `allowed`). best[j][i] covers layers
    0..i-1 with stages 0..j-1."""
    n, inf = model.n, float("inf")
    best = [[inf] * (n + 1) for _ in range(pipe + 1)]
    arg = [[0] * (n + 1) for _ in range(pipe + 1)]
    best[0][0] = 0
    for j in range(1, pipe + 1):
        for i in [n] if j == pipe else range(j, n - (pipe - j) + 1):
            for k in range(i - 1, j - 2, -1):  # stage j-1 holds layers k..i-1; grows as k falls
                if model.total(j - 1, k, i, pipe=pipe, data=data) > cap:
                    break
                if best[j - 1][k] == inf or (allowed is not None and not allowed(k, i)):
                    continue
                cand = max(best[j - 1][k], value(j - 1, k, i))
                if cand < best[j][i]:
                    best[j][i], arg[j][i] = cand, k
    bounds = [n]
    for j in range(pipe, 0, -1):
        bounds.append(arg[j][bounds[-1]])
    bounds.reverse()
    return best[pipe][n], [bounds[s + 1] - bounds[s] for s in range(pipe)]


def fits(model: StageModel, pipe: int, data: int) -> bool:
    return pipe <= model.n and greedy_parts(model, pipe, data, cap_bytes(model)) is not None


def min_data(model: StageModel, pipe: int, max_data: int) -> int | None:
    """Fewest data-parallel replicas with which `pipe` stages fit (more replicas only shrink a
    partitioned optimizer), or None within max_data."""
    if not model.path.partitioned:
        return 1 if fits(model, pipe, 1) else None
    if not fits(model, pipe, max_data):
        return None
    low, high = 0, max_data  # fits(high), not fits(low) (low 0 stands for "none")
    while high - low > 1:
        mid = (low + high) // 2
        if fits(model, pipe, mid):
            high = mid
        else:
            low = mid
    return high


def min_gpus(model: StageModel, *, max_gpus: int = 65536) -> tuple[int, int] | None:
    """(pipe, data) with the fewest GPUs that fit; ties go to the shorter pipeline."""
    best: tuple[int, int] | None = None
    for pipe in range(1, model.n + 1):
        if best is not None and pipe >= best[0] * best[1]:
            break
        data = min_data(model, pipe, max(1, max_gpus // pipe))
        if data is not None and (best is None or pipe * data < best[0] * best[1]):
            best = (pipe, data)
    return best


def choose_pipe(model: StageModel, gpus: int) -> tuple[int, int, bool]:
    """(pipe, data, fits) for `gpus` GPUs: the shortest pipeline dividing `gpus` that fits (the
    rest data-parallel, which keeps pipeline bubbles small); if none fits, the deepest one."""
    candidates = [p for p in range(1, min(gpus, model.n) + 1) if gpus % p == 0]
    for pipe in candidates:
        if fits(model, pipe, gpus // pipe):
            return pipe, gpus // pipe, True
    pipe = candidates[-1]
    return pipe, gpus // pipe, False
