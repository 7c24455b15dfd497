"""Exact tokens and labels per sample type on the shipped tokenizer; shift and truncation rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from data import IGNORE_INDEX, DataSettings, load_rows, load_template, shift_labels
from data.masking import n_trained_targets
from data.readers import parse_sources
from data.rows import tokenize_samples

X = IGNORE_INDEX


def encode(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase, sample: dict, **options: object
) -> tuple[list, list]:
    """(input_ids, labels) of one sample through the real pipeline (file -> tokens)."""
    path = tmp_path / "sample.json"
    path.write_text(json.dumps([sample], ensure_ascii=False), encoding="utf-8")
    table = tokenize_samples(
        parse_sources(path),
        load_template(options.pop("template", None)),
        tokenizer,
        max_seq_len=options.pop("max_seq_len", 512),
        **options,
    )
    ids, labels = table.tokens(0)
    return ids.tolist(), labels.tolist()


# text: "<s>Zorbia's capital is Quillon.</s>" - trained whole, except BOS (no token predicts it)
def test_pretrain(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    ids, labels = encode(
        tmp_path, data_tokenizer, {"type": "pretrain", "text": "Zorbia's capital is Quillon."}
    )
    assert ids == [1, 342, 560, 457, 287, 415, 16, 2]
    assert labels == [X, 342, 560, 457, 287, 415, 16, 2]


# "<s>### User:\nWhat is the capital of Zorbia?\n\n### Assistant:\nZorbia's capital is Quillon.</s>"
def test_instruct_without_input(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = {
        "type": "instruct",
        "instruct": "What is the capital of Zorbia?",
        "output": "Zorbia's capital is Quillon.",
    }
    ids, labels = encode(tmp_path, data_tokenizer, sample)
    assert ids == [
        1,
        267,
        290,
        266,
        454,
        287,
        268,
        457,
        321,
        373,
        334,
        267,
        298,
        266,
        342,
        560,
        457,
        287,
        415,
        16,
        2,
    ]
    assert labels == [X] * 14 + [342, 560, 457, 287, 415, 16, 2]
    assert "Input" not in data_tokenizer.decode(ids)


# "<s>### User:\nAdd the two numbers.\n\nInput:\n17 and 25\n\n### Assistant:\n17 + 25 = 42</s>"
def test_instruct_with_input(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = {
        "type": "instruct",
        "instruct": "Add the two numbers.",
        "input": "17 and 25",
        "output": "17 + 25 = 42",
    }
    ids, labels = encode(tmp_path, data_tokenizer, sample)
    assert ids == [
        1,
        267,
        290,
        266,
        35,
        563,
        268,
        662,
        1009,
        1114,
        312,
        599,
        266,
        1102,
        308,
        223,
        1103,
        271,
        267,
        298,
        266,
        1102,
        806,
        223,
        1103,
        920,
        223,
        882,
        2,
    ]
    assert labels == [X] * 21 + [1102, 806, 223, 1103, 920, 223, 882, 2]


# "<s>### User:\nHello!\n\n### Assistant:\nHi.</s>\n\n### User:\nIs 37 odd?\n\n### User:\nAnd 42?\n\n
#  ### Assistant:\n37 is odd, 42 is even.</s>" - two asks in a row become two user turns
def test_conversation_with_consecutive_asks(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    rounds = [
        ["ask", "Hello!"],
        ["ans", "Hi."],
        ["ask", "Is 37 odd?"],
        ["ask", "And 42?"],
        ["ans", "37 is odd, 42 is even."],
    ]
    ids, labels = encode(tmp_path, data_tokenizer, {"type": "conversation", "rounds": rounds})
    assert ids == [
        1,
        267,
        290,
        266,
        1482,
        3,
        271,
        267,
        298,
        266,
        42,
        75,
        16,
        2,
        271,
        267,
        290,
        266,
        43,
        85,
        223,
        773,
        1240,
        334,
        267,
        290,
        266,
        1104,
        70,
        223,
        882,
        334,
        267,
        298,
        266,
        773,
        287,
        1240,
        14,
        223,
        882,
        287,
        509,
        16,
        2,
    ]
    assert labels == ([X] * 10 + [42, 75, 16, 2] + [X] * 21 + [773, 287, 1240, 14, 223, 882, 287, 509, 16, 2])


# "<s>### User:\nReference:\nZorbia's capital is Quillon.\n\nWhat is the capital?\n\n
#  ### Assistant:\nQuillon.</s>"
def test_ref_qa_reference_is_untrained_context(
    tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase
) -> None:
    sample = {
        "type": "ref_qa",
        "reference": "Zorbia's capital is Quillon.",
        "rounds": [["ask", "What is the capital?"], ["ans", "Quillon."]],
    }
    ids, labels = encode(tmp_path, data_tokenizer, sample)
    assert ids == [
        1,
        267,
        290,
        266,
        672,
        266,
        342,
        560,
        457,
        287,
        415,
        312,
        454,
        287,
        268,
        457,
        334,
        267,
        298,
        266,
        404,
        412,
        16,
        2,
    ]
    assert labels == [X] * 20 + [404, 412, 16, 2]


# "<s>### System:\nBe brief.\n\n### User:\n你好\n\n### Assistant:\n你好！</s>"
def test_messages_with_system(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
    ]
    ids, labels = encode(tmp_path, data_tokenizer, {"type": "messages", "messages": messages})
    assert ids == [
        1,
        267,
        772,
        266,
        36,
        71,
        1273,
        75,
        71,
        72,
        312,
        267,
        290,
        266,
        1443,
        271,
        267,
        298,
        266,
        1443,
        272,
        226,
        2,
    ]
    assert labels == [X] * 19 + [1443, 272, 226, 2]


def test_train_on_prompt_trains_everything(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = {
        "type": "ref_qa",
        "reference": "Zorbia's capital is Quillon.",
        "rounds": [["ask", "What is the capital?"], ["ans", "Quillon."]],
    }
    ids, labels = encode(tmp_path, data_tokenizer, sample, train_on_prompt=True)
    assert labels == ids


def test_system_line_from_template(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    sample = {"type": "instruct", "instruct": "Hi", "output": "Hello."}
    ids, labels = encode(tmp_path, data_tokenizer, sample, template={"system": "Be brief."})
    assert (
        data_tokenizer.decode(ids)
        == "<s>### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.</s>"
    )
    assert data_tokenizer.decode([i for i in labels if i != X]) == "Hello.</s>"


def test_shift_labels() -> None:
    labels = np.array([X, X, 5, 6, 2], dtype=np.int32)
    assert shift_labels(labels).tolist() == [X, 5, 6, 2, X]


def test_shift_labels_keeps_concatenated_samples_apart() -> None:
    # two samples [X, 5, 2] and [7, 8]: the first's last position must not learn the second's 7
    labels = np.array([X, 5, 2, 7, 8], dtype=np.int32)
    offsets = np.array([0, 3, 5])
    assert shift_labels(labels, offsets).tolist() == [5, 2, X, 8, X]


CONVERSATION = {
    "type": "conversation",
    "rounds": [["ask", "Hello!"], ["ans", "Hi."], ["ask", "Is 37 odd?"], ["ans", "37 is odd."]],
}


def test_truncation_at_every_length(tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase) -> None:
    """Cutting at every length keeps ids and labels an exact prefix: nothing is rewritten, so a cut
    prompt never ends in a (trained) EOS."""
    full_ids, full_labels = encode(tmp_path, data_tokenizer, CONVERSATION)
    for max_len in range(2, len(full_ids) + 2):
        ids, labels = encode(tmp_path, data_tokenizer, CONVERSATION, max_seq_len=max_len)
        assert ids == full_ids[:max_len]
        assert labels == full_labels[:max_len]


def test_truncation_drops_samples_with_nothing_trained(
    tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Rows exist exactly for the lengths that leave a trained target after the shift; a sample
    whose trained tokens are all cut away is dropped and counted (no NaN loss from 0 tokens)."""
    full_ids, full_labels = encode(tmp_path, data_tokenizer, CONVERSATION)
    first_trained = next(i for i, label in enumerate(full_labels) if label != X)  # 10: "H" of "Hi."
    for max_len in (first_trained, first_trained + 1, first_trained + 2, len(full_ids)):
        has_target = n_trained_targets(np.array(full_labels[:max_len])) > 0
        settings = DataSettings(paths=str(tmp_path / "sample.json"), max_seq_len=max_len)
        if not has_target:
            with pytest.raises(
                ValueError, match="no sample left to train on: 1 valid samples, 1 of them dropped"
            ):
                load_rows(settings, data_tokenizer)
            continue
        rows = load_rows(settings, data_tokenizer)
        assert rows.stats["dropped_no_trained"] == 0
        assert rows.stats["truncated"] == int(max_len < len(full_ids))
        assert rows.targets[0].tolist()[: max_len - 1] == full_labels[1:max_len]
        assert rows.targets[0, max_len - 1] == X
    assert first_trained == 10


def test_dropped_sample_is_counted_and_left_out(
    tmp_path: Path, data_tokenizer: PreTrainedTokenizerBase
) -> None:
    long_prompt = {"type": "instruct", "instruct": "word " * 40, "output": "answer"}
    short = {"type": "instruct", "instruct": "Hi", "output": "Hello."}
    path = tmp_path / "two.json"
    path.write_text(json.dumps([long_prompt, short]), encoding="utf-8")
    rows = load_rows(DataSettings(paths=str(path), max_seq_len=24), data_tokenizer)
    assert rows.stats["dropped_no_trained"] == 1
    assert rows.stats["truncated"] == 1
    assert len(rows) == 1
    assert rows.row_samples(0) == [(str(path), 1)]
    assert rows.n_trained.tolist() == [int((rows.targets[0] != X).sum())]
    assert rows.n_trained[0] > 0
