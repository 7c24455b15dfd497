"""Rows: padded and packed layout, efficiency, per-sample losses with the real layers, the cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BloomConfig, LlamaConfig, PreTrainedTokenizerBase

from data import IGNORE_INDEX, DataError, DataSettings, Rows, load_rows
from data.packing import pack_best_fit
from data.rows import length_histogram

REPO = Path(__file__).resolve().parents[1]
SAMPLES = str(REPO / "data" / "samples")
T = 128


@pytest.fixture(scope="module")
def data_padded(data_tokenizer: PreTrainedTokenizerBase) -> Rows:
    return load_rows(DataSettings(paths=SAMPLES, max_seq_len=T), data_tokenizer)


@pytest.fixture(scope="module")
def data_packed(data_tokenizer: PreTrainedTokenizerBase) -> Rows:
    return load_rows(DataSettings(paths=SAMPLES, max_seq_len=T, pack=True), data_tokenizer)


def _samples_of(rows: Rows) -> dict[tuple[str, int], tuple[list[int], list[int], list[int]]]:
    """(file, index) -> (input_ids, targets, position_ids) of every sample placed in the rows."""
    out = {}
    for r in range(len(rows)):
        for seg, sample in enumerate(rows.row_samples(r), start=1):
            keep = rows.segment_ids[r] == seg
            out[sample] = (
                rows.input_ids[r][keep].tolist(),
                rows.targets[r][keep].tolist(),
                rows.position_ids[r][keep].tolist(),
            )
    return out


def test_padded_layout(data_padded: Rows, data_tokenizer: PreTrainedTokenizerBase) -> None:
    rows = data_padded
    assert len(rows) == 53 and rows.input_ids.shape == (53, T) and rows.input_ids.dtype == np.int32
    for r in range(len(rows)):
        n = int((rows.segment_ids[r] == 1).sum())
        assert rows.segment_ids[r].tolist() == [1] * n + [0] * (T - n)
        assert rows.position_ids[r].tolist() == list(range(T))
        assert rows.input_ids[r, n:].tolist() == [data_tokenizer.pad_token_id] * (T - n)
        assert rows.targets[r, n - 1 :].tolist() == [IGNORE_INDEX] * (T - n + 1)
        assert rows.input_ids[r, n - 1] == data_tokenizer.eos_token_id  # nothing truncated at T=128
        assert rows.n_trained[r] == int((rows.targets[r] != IGNORE_INDEX).sum())


def test_targets_are_labels_shifted_once(data_padded: Rows) -> None:
    # every trained target is the next input token: targets[t] == input_ids[t + 1]
    ids, targets = data_padded.input_ids, data_padded.targets
    trained = targets[:, :-1] != IGNORE_INDEX
    assert (targets[:, :-1][trained] == ids[:, 1:][trained]).all()


def test_packed_rows_keep_samples_apart(data_packed: Rows, data_padded: Rows) -> None:
    rows = data_packed
    assert len(rows) < len(data_padded)
    for r in range(len(rows)):
        segments = rows.segment_ids[r].tolist()
        k = len(rows.row_samples(r))
        used = sum(1 for s in segments if s)
        assert sorted(set(segments) - {0}) == list(range(1, k + 1))
        assert segments[:used] == sorted(segments[:used]) and segments[used:] == [0] * (T - used)
        # padding continues the last sample's positions; the last position of each sample trains nothing
        starts = [t for t in range(used) if t == 0 or segments[t] != segments[t - 1]]
        assert rows.position_ids[r, used:].tolist() == list(range(used - starts[-1], T - starts[-1]))
        for end in [*starts[1:], used]:
            assert rows.targets[r, end - 1] == IGNORE_INDEX
    packed, padded = _samples_of(rows), _samples_of(data_padded)
    assert packed == padded  # every sample: same ids, targets and positions 0..n-1 in both layouts


def test_efficiency_stats(data_packed: Rows, data_padded: Rows) -> None:
    for rows in (data_packed, data_padded):
        stats = rows.stats
        assert stats["tokens_all"] == len(rows) * T
        assert stats["tokens_real"] == int((rows.segment_ids > 0).sum())
        assert stats["tokens_trained"] == int(rows.n_trained.sum())
        assert stats["efficiency_real"] == stats["tokens_real"] / stats["tokens_all"]
        assert stats["by_type"] == {
            "pretrain": 10,
            "instruct": 15,
            "conversation": 10,
            "ref_qa": 6,
            "messages": 12,
        }
    assert data_packed.stats["tokens_trained"] == data_padded.stats["tokens_trained"]
    assert data_packed.stats["efficiency_real"] > 0.9
    assert data_padded.stats["efficiency_real"] < 0.5


def test_pack_best_fit() -> None:
    lengths = np.array([60, 40, 70, 30, 50, 50])
    groups = pack_best_fit(lengths, 100, seed=0)
    assert sorted(e for g in groups for e in g) == list(range(6))
    assert sorted(sorted(int(lengths[e]) for e in g) for g in groups) == [[30, 70], [40, 60], [50, 50]]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 300, size=500)
    groups = pack_best_fit(lengths, 300, seed=3)
    assert sorted(e for g in groups for e in g) == list(range(500))
    assert max(sum(int(lengths[e]) for e in g) for g in groups) <= 300
    assert len(groups) <= 1.05 * lengths.sum() / 300 + 1
    assert groups == pack_best_fit(lengths, 300, seed=3)


def _per_sample_loss(
    rows: Rows, stack: torch.nn.Module, *, merge_segments: bool = False
) -> dict[tuple[str, int], float]:
    """Summed cross entropy of each sample's trained targets, from full logits [B, T, V].
    merge_segments: tell the model that all samples of a row are one (a control that must leak)."""
    segment_ids = (rows.segment_ids > 0) if merge_segments else rows.segment_ids
    with torch.no_grad():
        logits = stack.logits(
            *(
                torch.from_numpy(np.asarray(a, dtype=np.int64))
                for a in (rows.input_ids, rows.position_ids, segment_ids)
            )
        )
    targets = torch.from_numpy(np.asarray(rows.targets, dtype=np.int64))
    loss = F.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    out = {}
    for r in range(len(rows)):
        for seg, sample in enumerate(rows.row_samples(r), start=1):
            out[sample] = float(loss[r][torch.from_numpy(rows.segment_ids[r] == seg)].sum())
    return out


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            vocab_size=1536,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=T,
        ),
        BloomConfig(vocab_size=1536, hidden_size=32, n_layer=2, n_head=4),
    ],
    ids=["llama", "bloom"],
)
def test_packed_batch_gives_the_per_sample_losses_of_samples_run_alone(
    config: object, data_packed: Rows, data_padded: Rows
) -> None:
    # imported here: the only data test that needs the models package
    from models.spec import BuildOptions, spec_from_config
    from models.stack import LayerStack, fill_random

    spec = spec_from_config(config)
    packed_model, padded_model = LayerStack(spec, BuildOptions(packed=True)), LayerStack(spec, BuildOptions())
    fill_random(packed_model.pairs(), seed=0, std=0.5)  # large weights: cross-sample leaks would show
    padded_model.load_state_dict(packed_model.state_dict())
    alone = _per_sample_loss(data_padded, padded_model)
    together = _per_sample_loss(data_packed, packed_model)
    assert together.keys() == alone.keys()
    for sample, loss in alone.items():
        assert together[sample] == pytest.approx(loss, rel=1e-4), sample
    leaky = _per_sample_loss(data_packed, packed_model, merge_segments=True)  # attention across samples
    assert any(leaky[s] != pytest.approx(alone[s], rel=1e-4) for s in alone)


def _write_samples(path: Path, n: int) -> None:
    samples = [{"type": "instruct", "instruct": f"Question {i}?", "output": f"Answer {i}."} for i in range(n)]
    path.write_text(json.dumps(samples), encoding="utf-8")


def test_cache_build_reuse_and_key(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    data, cache = tmp_path / "d.json", tmp_path / "cache"
    _write_samples(data, 5)
    settings = DataSettings(paths=str(data), max_seq_len=32)
    built = load_rows(settings, data_tokenizer, cache_dir=cache, builder=True)
    (entry,) = cache.iterdir()
    assert entry.name.startswith("rows-") and (entry / "COMPLETE").is_file()
    again = load_rows(settings, data_tokenizer, cache_dir=cache, builder=False, timeout_s=0)
    assert isinstance(again.input_ids, np.memmap)
    in_memory = load_rows(settings, data_tokenizer)
    for name in ("input_ids", "targets", "position_ids", "segment_ids", "n_trained"):
        assert np.array_equal(getattr(again, name), getattr(in_memory, name))
    assert again.stats == in_memory.stats == built.stats
    assert [again.row_samples(i) for i in range(5)] == [[(str(data), i)] for i in range(5)]

    load_rows(DataSettings(paths=str(data), max_seq_len=33), data_tokenizer, cache_dir=cache)
    load_rows(
        DataSettings(paths=str(data), max_seq_len=32, template={"system": "S."}),
        data_tokenizer,
        cache_dir=cache,
    )
    no_bos = AutoTokenizer.from_pretrained(REPO / "configs" / "tiny-llama", add_bos_token=False)
    load_rows(settings, no_bos, cache_dir=cache)
    _write_samples(data, 6)  # same path, new content
    load_rows(settings, data_tokenizer, cache_dir=cache)
    assert len(list(cache.iterdir())) == 5


def test_waiting_reader_times_out_naming_the_dir(
    tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase
) -> None:
    _write_samples(tmp_path / "d.json", 2)
    settings = DataSettings(paths=str(tmp_path / "d.json"), max_seq_len=32)
    with pytest.raises(
        DataError, match=rf"waited 0 s for the data cache {tmp_path / 'cache'}/rows-\w+ to be built"
    ):
        load_rows(settings, data_tokenizer, cache_dir=tmp_path / "cache", builder=False, timeout_s=0.1)


def test_readers_wait_for_the_builder(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    """Ranks that are not the builder wait, then read what the builder wrote; two builders racing
    end with one complete cache."""
    _write_samples(tmp_path / "d.json", 50)
    settings = DataSettings(paths=str(tmp_path / "d.json"), max_seq_len=32, pack=True)
    results: dict[str, Rows] = {}

    def run(name: str, builder: bool) -> None:
        results[name] = load_rows(
            settings, data_tokenizer, cache_dir=tmp_path / "cache", builder=builder, timeout_s=60
        )

    threads = [threading.Thread(target=run, args=(f"reader{i}", False)) for i in range(2)]
    threads += [threading.Thread(target=run, args=(f"builder{i}", True)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["builder0", "builder1", "reader0", "reader1"]
    assert [p.name.startswith("rows-") for p in (tmp_path / "cache").iterdir()] == [True]
    for rows in results.values():
        assert np.array_equal(rows.input_ids, results["builder0"].input_ids)


def test_rows_filled_in_chunks_equal_one_pass(
    data_packed: Rows, data_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("data.packing.ROW_CHUNK", 5)
    chunked = load_rows(DataSettings(paths=SAMPLES, max_seq_len=T, pack=True), data_tokenizer)
    for name in ("input_ids", "targets", "position_ids", "segment_ids", "n_trained"):
        assert np.array_equal(getattr(chunked, name), getattr(data_packed, name)), name


def test_length_histogram() -> None:
    lengths = np.array([1, 16, 17, 64, 128, 129, 500])
    assert length_histogram(lengths, 128) == {
        "1-16": 2,
        "17-32": 1,
        "33-48": 0,
        "49-64": 1,
        "65-80": 0,
        "81-96": 0,
        "97-112": 0,
        "113-128": 1,
        ">128": 2,
    }
