"""Segment-by-segment tokenization that gives the ids of the whole rendered text.

Tokenizing each segment on its own must give exactly the ids that `apply_chat_template` (the whole
text at once) gives at inference; otherwise the model is trained on token sequences it never sees
when it is used. Two things differ when a piece of text is encoded alone:

* sentencepiece-style (Metaspace) tokenizers put a dummy "▁" in front of a text that starts the
  input, and, in legacy mode, in front of every piece of text after a special token;
* byte-level BPE may merge characters across the boundary.

Templates put every boundary right after a newline or a special token, where no merge crosses
(newline is its own pre-token in byte-level BPE and appears in no sentencepiece piece). A segment
that is not the first is therefore encoded behind that newline or special token (the "anchor") —
its context in the whole text — and the anchor's ids are removed again. `check_whole_text` compares
the result with the whole text's ids; the pipeline runs it on the first samples of every type.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from data.errors import DataError
from data.template import PromptTemplate, Segment


class TokenizerInfo:
    """What the data pipeline needs to know about a tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
            raise DataError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token: set one (eos_token in "
                "tokenizer_config.json); it ends every answer and every pretraining text"
            )
        self.eos: str = str(tokenizer.eos_token)
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.bos: str = str(tokenizer.bos_token) if adds_bos(tokenizer) else ""
        """The BOS text when the tokenizer adds BOS at the start of a text (llama), else ""."""
        self.pad_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        # longest first, so "<|endoftext|>" is found before a shorter token it ends with
        specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.specials: tuple[str, ...] = tuple(sorted(specials, key=len, reverse=True))


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding a text with special tokens puts BOS first (llama: yes; bloom, qwen2: no)."""
    if tokenizer.bos_token_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id


def chat_template_for(template: PromptTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat_template for `tokenizer`: `{{ bos_token }}` only if the tokenizer adds BOS.

    Export sets `tokenizer.chat_template = chat_template_for(load_template(pipeline_dir), tokenizer)`.
    """
    return template.to_jinja(add_bos=adds_bos(tokenizer))


class SegmentEncoder:
    """Encodes batches of segmented samples with a fast (Rust) tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.info = TokenizerInfo(tokenizer)
        # the Rust tokenizer directly: no Python-side BatchEncoding per text
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        self._anchor_ids: dict[str, list[int]] = {}
        self._check_special(self.info.eos, self.info.eos_id)
        if self.info.bos:
            self._check_special(self.info.bos, int(tokenizer.bos_token_id))

    def encode(self, samples: Sequence[Sequence[Segment]]) -> list[list[list[int]]]:
        """Token ids per segment per sample; their concatenation equals the whole text's ids."""
        texts: list[str] = []
        anchors: list[str] = []
        for segments in samples:
            previous = None
            for segment in segments:
                anchor = "" if previous is None else self._anchor(previous)
                texts.append(anchor + segment.text)
                anchors.append(anchor)
                previous = segment.text
        encoded = iter(self._encode_texts(texts))
        flat = [self._strip_anchor(next(encoded), anchor) for anchor in anchors]
        out: list[list[list[int]]] = []
        start = 0
        for segments in samples:
            out.append(flat[start : start + len(segments)])
            start += len(segments)
        return out

    def check_whole_text(
        self, segments: Sequence[Segment], segment_ids: Sequence[Sequence[int]], where: str
    ) -> None:
        """Raise if the segment-wise ids differ from tokenizing the whole text at once."""
        text = "".join(s.text for s in segments)
        whole = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [i for ids in segment_ids for i in ids]
        if pieces == whole:
            return
        at = next((k for k, (a, b) in enumerate(zip(pieces, whole)) if a != b), min(len(pieces), len(whole)))
        raise DataError(
            f"{where}: tokenizing segment by segment gives different ids than the whole text at token {at}: "
            f"{self.tokenizer.convert_ids_to_tokens(pieces[at : at + 4])} vs "
            f"{self.tokenizer.convert_ids_to_tokens(whole[at : at + 4])}. The template's boundaries between "
            "trained and untrained text must follow a newline or a special token for this tokenizer; "
            "change the template (e.g. assistant_header) or report the tokenizer",
            reason="tokenizer boundary",
        )

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def _anchor(self, previous: str) -> str:
        if previous.endswith("\n"):
            return "\n"
        for special in self.info.specials:
            if previous.endswith(special):
                return special
        raise DataError(
            f"a segment boundary follows {previous[-30:]!r}, which ends neither with a newline nor with a "
            "special token of the tokenizer; such a boundary may tokenize differently in pieces than in the "
            "whole text: end the template's headers with a newline",
            reason="tokenizer boundary",
        )

    def _strip_anchor(self, ids: list[int], anchor: str) -> list[int]:
        if not anchor:
            return ids
        prefix = self._anchor_ids.get(anchor)
        if prefix is None:
            prefix = self._anchor_ids[anchor] = self._encode_texts([anchor])[0]
        if ids[: len(prefix)] != prefix:
            raise DataError(
                f"the tokenizer merges the segment anchor {anchor!r} with the text after it "
                f"({self.tokenizer.convert_ids_to_tokens(ids[: len(prefix) + 2])}), so a trained segment "
                "cannot start there: end the template's headers with a newline or a special token",
                reason="tokenizer boundary",
            )
        return ids[len(prefix) :]

    def _check_special(self, text: str, token_id: int) -> None:
        ids = self._encode_texts([text])[0]
        if ids != [token_id]:
            raise DataError(
                f"the tokenizer encodes its special token {text!r} as {ids}, not as its id [{token_id}] "
                "(is split_special_tokens set?); the rendered text relies on special tokens being parsed"
            )
