"""The pipeline dir: one safetensors file per pipeline layer, the HF config and tokenizer, and a
manifest written last (a dir without a manifest is incomplete and never read).

Nothing here unpickles: weights are safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.template import TEMPLATE_FILENAME as TEMPLATE_FILE  # noqa: F401  (written by data.save_template)
from models.spec import BuildOptions, ModelSpec, load_spec, slots

FORMAT = "pipeft-pipeline/1"
MANIFEST = "manifest.json"
WEIGHTS_SUBDIR = "weights"  # training output: save_path/weights/step_XXXXXXXX/


class PipelineDirError(ValueError):
    """A missing, incomplete or mismatched pipeline dir; the message names the file and the fix."""


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


@dataclass
class Manifest:
    family: str
    model_type: str
    num_blocks: int
    num_layers: int
    dtype: str
    tied: bool
    layers: list[str]
    step: int | None = None  # training step these weights are from; None for a converted checkpoint
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_spec(cls, spec: ModelSpec, dtype: torch.dtype, step: int | None = None) -> Manifest:
        return cls(family=spec.family.name, model_type=spec.model_type, num_blocks=spec.num_blocks,
                   num_layers=spec.num_layers, dtype=str(dtype).removeprefix("torch."), tied=spec.tied,
                   layers=[layer_file(i) for i in range(spec.num_layers)], step=step)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically, after every layer file: its presence marks the dir complete."""
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineDirError(f"pipeline dir {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        raise PipelineDirError(
            f"{directory} has no {MANIFEST}: it is not a pipeline dir, or its writing was interrupted; "
            f"create it with `python convert_model.py hg_to_pp --input-path HF_DIR --save-path {directory}`")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise PipelineDirError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
    return Manifest(**data)


def resolve_pipeline_dir(path: str | Path) -> Path:
    """A pipeline dir, or a training save_path: then its newest complete weights."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    weights = path / WEIGHTS_SUBDIR
    candidates = sorted(d for d in weights.glob("step_*") if (d / MANIFEST).is_file()) if weights.is_dir() else []
    if candidates:
        return candidates[-1]
    read_manifest(path)  # raises the right error (missing dir / not a pipeline dir)
    raise AssertionError("unreachable")


def expected_params(spec: ModelSpec) -> list[dict[str, tuple[tuple[int, ...], str]]]:
    """Per pipeline layer: parameter name -> (shape, owning slot kind), from modules built on the
    meta device (no memory). The tied head owns nothing: its weight is the embedding's."""
    out: list[dict[str, tuple[tuple[int, ...], str]]] = [{} for _ in range(spec.num_layers)]
    with torch.device("meta"):
        for slot in slots(spec, BuildOptions()):
            if slot.kind == "tied_head":
                continue
            for name, tensor in slot.build().state_dict().items():
                out[slot.layer][name] = (tuple(tensor.shape), slot.kind)
    return out


def check_layer_tensors(spec: ModelSpec, layer: int, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes of one layer against what the model builds; errors name the key."""
    expected = expected_params(spec)[layer]
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise PipelineDirError(
            f"{source}: layer {layer} does not match the model in config.json: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}; re-create the pipeline dir from the HF checkpoint")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name][0]:
            raise PipelineDirError(
                f"{source}: {name} has shape {list(shape)} but config.json implies {list(expected[name][0])}; "
                f"the weights and config.json come from different models")


def read_layer(directory: Path, layer: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one layer file (only that file is opened)."""
    path = Path(directory) / layer_file(layer)
    if not path.is_file():
        raise PipelineDirError(f"{path} is missing; the pipeline dir is incomplete: re-create it")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise PipelineDirError(f"{path} cannot be read ({err}); the file is truncated or corrupt: "
                               f"re-create the pipeline dir") from err


def layer_shapes(directory: Path, layer: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors header, without reading any weight."""
    path = Path(directory) / layer_file(layer)
    if not path.is_file():
        raise PipelineDirError(f"{path} is missing; the pipeline dir is incomplete: re-create it")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise PipelineDirError(f"{path} cannot be read ({err}); the file is truncated or corrupt") from err


def write_layer(directory: Path, layer: int, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(Path(directory) / layer_file(layer)), metadata={"format": "pt"})


def open_pipeline_dir(path: str | Path) -> tuple[Path, Manifest, ModelSpec]:
    """Resolve, read the manifest and config, and check that they agree."""
    directory = resolve_pipeline_dir(path)
    manifest = read_manifest(directory)
    spec = load_spec(directory)
    if (manifest.num_blocks, manifest.tied) != (spec.num_blocks, spec.tied):
        raise PipelineDirError(
            f"{directory}: {MANIFEST} says {manifest.num_blocks} blocks (tied={manifest.tied}) but config.json "
            f"says {spec.num_blocks} (tied={spec.tied}); re-create the pipeline dir")
    return directory, manifest, spec
