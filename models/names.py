"""HF parameter names <-> (pipeline layer, name in that layer's file), from the family's one
`FROM_HF` table; the reverse direction is derived by flipping it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from models.spec import ModelSpec


class WeightNameError(KeyError):
    """A parameter name the family's table does not know; the message names it."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class NameMap:
    spec: ModelSpec

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern[str], tuple[str, str] | None]]:
        prefix = re.escape(self.spec.family.hf_prefix)
        out = []
        for hf_name, target in self.spec.family.from_hf.items():
            body = re.escape(hf_name).replace(r"\{\}", r"(\d+)")
            out.append((re.compile(f"^(?:{prefix})?{body}$" if prefix else f"^{body}$"), target))
        return out

    @cached_property
    def _reverse(self) -> dict[tuple[str, str], str]:
        return {target: name for name, target in self.spec.family.from_hf.items() if target is not None}

    def to_pipeline(self, hf_name: str) -> tuple[int, str] | None:
        """`model.layers.3.mlp.up_proj.weight` -> (4, "mlp.up_proj.weight"); None for names the
        table drops on purpose. Unknown names and out-of-range block indices raise."""
        for pattern, target in self._patterns:
            match = pattern.match(hf_name)
            if match is None:
                continue
            if target is None:
                return None
            kind, local = target
            if kind == "embed":
                return 0, local
            if kind == "head":
                return self.spec.num_layers - 1, local
            block = int(match.group(1))
            if block >= self.spec.num_blocks:
                raise WeightNameError(
                    f"weight {hf_name!r} belongs to block {block}, but config.json says the model has "
                    f"{self.spec.num_blocks} blocks (num_hidden_layers); the checkpoint and config disagree")
            return block + 1, local
        raise WeightNameError(
            f"weight {hf_name!r} is not a known {self.spec.model_type} parameter; the checkpoint does not "
            f"match its config.json model_type, or this variant is not supported")

    def to_hf(self, layer: int, local: str) -> str:
        """The reverse: (4, "mlp.up_proj.weight") -> `model.layers.3.mlp.up_proj.weight`."""
        if layer == 0:
            kind = "embed"
        elif layer == self.spec.num_layers - 1:
            kind = "head"
        else:
            kind = "block"
        name = self._reverse.get((kind, local))
        if name is None:
            raise WeightNameError(f"pipeline layer {layer} has an unknown parameter {local!r}")
        if kind == "block":
            name = name.replace("{}", str(layer - 1))
        return self.spec.family.hf_prefix + name
