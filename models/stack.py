"""Filling layer modules with weights, and all pipeline layers run in order in one process
(`LayerStack`: tests, references, tools). The DeepSpeed pipeline fills its stage the same way."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from models.common import IGNORE_INDEX, init_hf_style_
from models.pipedir import PipelineDirError, layer_file, open_pipeline_dir, read_layer
from models.spec import BuildOptions, ModelSpec, Slot, slots, tied_head_forward, tied_head_logits


def fill_from_dir(directory: Path, pairs: list[tuple[Slot, nn.Module]]) -> None:
    """Load each module's weights from its layer file, reading only the files these modules need.

    A layer's file must hold exactly the parameters of its modules: a missing or unexpected
    name fails naming the file and the key. The tied head loads the embedding's file.
    """
    by_layer: dict[int, list[tuple[Slot, nn.Module]]] = defaultdict(list)
    for slot, module in pairs:
        by_layer[0 if slot.kind == "tied_head" else slot.layer].append((slot, module))
    for layer, members in sorted(by_layer.items()):
        tensors = read_layer(directory, layer)
        path = Path(directory) / layer_file(layer)
        used: set[str] = set()
        for slot, module in members:
            own = module.state_dict().keys()
            missing = sorted(k for k in own if k not in tensors)
            if missing:
                raise PipelineDirError(f"{path} lacks {missing}: the file does not match config.json; "
                                       f"re-create the pipeline dir")
            _check_shapes(path, module, tensors)
            module.load_state_dict({k: tensors[k] for k in own}, strict=True)
            used.update(own)
        if layer != 0 or any(s.kind == "embed" for s, _ in members):
            unexpected = sorted(set(tensors) - used)
            if unexpected:
                raise PipelineDirError(f"{path} holds unexpected weights {unexpected}: the file does not "
                                       f"match config.json; re-create the pipeline dir")


def _check_shapes(path: Path, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in module.state_dict().items():
        if tuple(tensors[name].shape) != tuple(value.shape):
            raise PipelineDirError(
                f"{path}: {name} has shape {list(tensors[name].shape)} but config.json implies "
                f"{list(value.shape)}; the weights and config.json come from different models")


def fill_random(pairs: list[tuple[Slot, nn.Module]], *, seed: int, std: float) -> None:
    """Seeded init per pipeline layer, so a layer's values do not depend on the topology. The
    tied head draws with the embedding's seed, giving the same values on the last stage."""
    for slot, module in pairs:
        layer = 0 if slot.kind == "tied_head" else slot.layer
        generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 7 + (slot.kind == "lm_head"))
        init_hf_style_(module, std=std, generator=generator)


def layer_tensors(pairs: list[tuple[Slot, nn.Module]]) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of fill_from_dir: layer -> {name: tensor} (the tied head adds nothing)."""
    out: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for slot, module in pairs:
        if slot.kind != "tied_head":
            out[slot.layer].update(module.state_dict())
    return dict(out)


class LayerStack(nn.Module):
    """The pipeline's layers in one process, in pipeline order."""

    def __init__(self, spec: ModelSpec, options: BuildOptions = BuildOptions()) -> None:
        super().__init__()
        self.spec = spec
        self.slot_list = slots(spec, options)
        # body: embed, blocks, final norm; head: the untied LM head (a tied one reuses body[0])
        self.body = nn.ModuleList(s.build() for s in self.slot_list[:-1])
        self.head = None if spec.tied else self.slot_list[-1].build()

    def pairs(self) -> list[tuple[Slot, nn.Module]]:
        modules = [*self.body, self.body[0] if self.head is None else self.head]
        return list(zip(self.slot_list, modules))

    @classmethod
    def from_pipeline_dir(cls, path: str | Path, options: BuildOptions = BuildOptions()) -> LayerStack:
        directory, _, spec = open_pipeline_dir(path)
        stack = cls(spec, options)
        fill_from_dir(directory, [(s, m) for s, m in stack.pairs() if s.kind != "tied_head"])
        return stack

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: logits [n, V] and targets [n] at trained positions only."""
        x = (input_ids, position_ids, segment_ids, targets)
        for module in self.body:
            x = module(x)
        return tied_head_forward(self.body[0], x) if self.head is None else self.head(x)

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full logits [B, T, V]; defaults: one right-padded sample per row."""
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        if segment_ids is None:
            segment_ids = torch.ones_like(input_ids)
        x = (input_ids, position_ids, segment_ids, torch.full_like(input_ids, IGNORE_INDEX))
        for module in self.body:
            x = module(x)
        hidden = x[0]
        return tied_head_logits(self.body[0], hidden) if self.head is None else self.head.project(hidden)
