"""hg_to_pp and pp_to_hg: HF checkpoint <-> pipeline dir, one layer in memory at a time.

Both directions use the family's one weight-name table (models/names.py). Tensors are copied
as stored (same dtype, same bytes), so HF -> pipeline -> HF is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.names import NameMap, WeightNameError
from models.pipedir import (
    TEMPLATE_FILE,
    Manifest,
    PipelineDirError,
    check_layer_tensors,
    expected_params,
    layer_file,
    layer_shapes,
    open_pipeline_dir,
    read_layer,
    write_layer,
    write_manifest,
)
from models.spec import ModelSpec, load_spec


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file or key and the fix."""


# Files copied verbatim beside the weights (whichever the checkpoint has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   TEMPLATE_FILE)
HF_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


# ---------------------------------------------------------------------------------------------
# Reading HF checkpoints


@dataclass(frozen=True)
class HFWeights:
    """Where every tensor of an HF checkpoint lives: name -> file."""

    directory: Path
    files: dict[str, Path]  # tensor name -> file

    @property
    def is_safetensors(self) -> bool:
        return all(p.suffix == ".safetensors" for p in self.files.values())


def index_hf_weights(directory: Path) -> HFWeights:
    """Find the checkpoint's weight files: safetensors (single or sharded with an index) first,
    then PyTorch .bin files (read with weights_only=True, never unpickling arbitrary objects)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(f"{index} is not a valid index file ({err})") from err
            files = {name: directory / fname for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise ConversionError(f"{index} lists {path.name}, which is missing: the download is incomplete")
            return HFWeights(directory, files)
        if (directory / single).is_file():
            return HFWeights(directory, {name: directory / single for name in _keys_of(directory / single)})
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise ConversionError(
        f"no weights in {directory} (looked for model.safetensors[.index.json] and pytorch_model.bin[.index.json]; "
        f"found {found[:12]}); save the model with model.save_pretrained(DIR)")


def _keys_of(path: Path) -> list[str]:
    with open_weight_file(path) as tensors:
        return list(tensors.keys())


@contextmanager
def open_weight_file(path: Path) -> Iterator:
    """A mapping-like view of one weight file that reads a tensor only when asked for it."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                yield _SafeView(f)
        except SafetensorError as err:
            raise ConversionError(f"{path} cannot be read ({err}): the file is truncated or corrupt; "
                                  f"download or save it again") from err
        return
    try:  # mmap: tensors stay on disk until used; weights_only: no arbitrary unpickling
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a bad archive
        raise ConversionError(f"{path} cannot be read as a PyTorch weights file ({err})") from err
    yield state
    del state


class _SafeView:
    def __init__(self, handle: object) -> None:
        self.handle = handle

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


def resolve_hf_input(path: str) -> Path:
    """A local dir, or a Hub model name downloaded to the local cache when the Hub is reachable."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ConversionError(f"--input-path {path} is a file; give the model directory")
        return local
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise ConversionError(f"--input-path {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated model ...
        reason = " ".join(str(err).split())  # the Hub client's messages span several lines
        raise ConversionError(
            f"--input-path {path} is not a local directory and could not be fetched from the Hugging Face "
            f"Hub ({type(err).__name__}: {reason}); download it elsewhere and pass the local directory") from err


# ---------------------------------------------------------------------------------------------
# hg_to_pp


def plan_layers(spec: ModelSpec, weights: HFWeights) -> list[dict[str, tuple[str, Path]]]:
    """Per pipeline layer: local name -> (HF name, file); unknown or missing names fail."""
    names = NameMap(spec)
    plan: list[dict[str, tuple[str, Path]]] = [{} for _ in range(spec.num_layers)]
    for hf_name, path in sorted(weights.files.items()):
        try:
            target = names.to_pipeline(hf_name)
        except WeightNameError as err:
            raise ConversionError(f"{path.name}: {err}") from err
        if target is None:
            continue
        layer, local = target
        if spec.tied and local == "lm_head.weight":
            continue  # a stored copy of the tied head: the embedding is the weight
        plan[layer][local] = (hf_name, path)
    return plan


def hg_to_pp(input_path: str, save_path: str, *, progress: bool = True) -> Path:
    """Convert an HF checkpoint dir (or Hub name) into a pipeline dir at `save_path`."""
    src = resolve_hf_input(input_path)
    spec = load_spec(src)
    weights = index_hf_weights(src)
    plan = plan_layers(spec, weights)
    shapes = _planned_shapes(plan)
    for layer in range(spec.num_layers):
        try:
            check_layer_tensors(spec, layer, shapes[layer], source=str(src))
        except PipelineDirError as err:
            raise ConversionError(_with_hf_names(str(err), spec, layer)) from err
    out = _fresh_dir(Path(save_path), source=src)
    dtypes: dict[torch.dtype, int] = defaultdict(int)
    for layer in tqdm(range(spec.num_layers), desc="hg_to_pp", unit="layer", disable=not progress):
        tensors = _read_planned(plan[layer])
        for t in tensors.values():
            dtypes[t.dtype] += t.numel()
        write_layer(out, layer, tensors)
        del tensors  # one layer in memory at a time
    _copy_side_files(src, out, require_tokenizer=True)
    write_manifest(out, Manifest.for_spec(spec, max(dtypes, key=dtypes.get)))
    return out


def _planned_shapes(plan: list[dict[str, tuple[str, Path]]]) -> list[dict[str, tuple[int, ...]]]:
    """Shapes from file headers, without reading weights."""
    out: list[dict[str, tuple[int, ...]]] = []
    for layer_plan in plan:
        by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
        for local, (hf_name, path) in layer_plan.items():
            by_file[path].append((local, hf_name))
        shapes: dict[str, tuple[int, ...]] = {}
        for path, items in by_file.items():
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for local, hf_name in items:
                        shapes[local] = tuple(f.get_slice(hf_name).get_shape())
            else:
                with open_weight_file(path) as state:
                    for local, hf_name in items:
                        shapes[local] = tuple(state[hf_name].shape)
        out.append(shapes)
    return out


def _with_hf_names(message: str, spec: ModelSpec, layer: int) -> str:
    """Pipeline-local names in an error, translated to the names the user's checkpoint uses."""
    names = NameMap(spec)
    for local in expected_params(spec)[layer]:
        message = message.replace(f"'{local}'", f"'{names.to_hf(layer, local)}'")
    return message


def _read_planned(layer_plan: dict[str, tuple[str, Path]]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for local, (hf_name, path) in layer_plan.items():
        by_file[path].append((local, hf_name))
    tensors: dict[str, torch.Tensor] = {}
    for path, items in by_file.items():
        with open_weight_file(path) as state:
            for local, hf_name in items:
                # Copy-on-write views of the mapped file: no second copy of the layer in memory.
                tensors[local] = state[hf_name]
    return tensors


def _fresh_dir(path: Path, *, source: Path) -> Path:
    """An empty output dir; an existing pipeline/HF dir there is replaced, anything else refused,
    and never the dir being read (or one containing or inside it)."""
    out, src = path.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise ConversionError(f"--save-path {path} overlaps --input-path {source}; write the result to another dir")
    if path.exists():
        if any(path.iterdir()) and not ((path / "manifest.json").exists() or (path / "config.json").exists()):
            raise ConversionError(f"--save-path {path} exists and is not a model dir; choose an empty or new dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _copy_side_files(src: Path, dst: Path, *, require_tokenizer: bool) -> None:
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if require_tokenizer and not any((src / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConversionError(
            f"{src} has no tokenizer files; training needs the tokenizer: save it beside the model with "
            f"tokenizer.save_pretrained({src})")


# ---------------------------------------------------------------------------------------------
# pp_to_hg


def pp_to_hg(input_path: str, save_path: str, *, max_shard_bytes: int | None = None,
             lm_head_copy: bool = False, progress: bool = True) -> Path:
    """Write an HF model dir (sharded safetensors, config, generation config, tokenizer with the
    training chat template) from a pipeline dir or a training save_path (its newest weights).

    Shards hold whole layers; by default each is at most the size of the largest layer, so memory
    stays near one layer. `lm_head_copy` also stores a tied head as `lm_head.weight`, which some
    inference servers need for bloom (the default keeps transformers' own layout, bit-exact).
    """
    directory, manifest, spec = open_pipeline_dir(input_path)
    names = NameMap(spec)
    sizes = [_layer_bytes(directory, i) for i in range(spec.num_layers)]
    limit = max_shard_bytes or max(sizes)
    groups = _shard_groups(sizes, limit)
    out = _fresh_dir(Path(save_path), source=directory)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=spec.num_layers, desc="pp_to_hg", unit="layer", disable=not progress)
    for shard_no, layers in enumerate(groups, start=1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{shard_no:05d}-of-{len(groups):05d}.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for layer in layers:
            for local, tensor in read_layer(directory, layer).items():
                shard[names.to_hf(layer, local)] = tensor
            bar.update(1)
        if lm_head_copy and spec.tied and spec.num_layers - 1 in layers:
            # a separate tensor (clone): safetensors refuses two names for one storage
            shard["lm_head.weight"] = read_layer(directory, 0)["embed.weight"].clone()
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard
    bar.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_hf_side_files(directory, out, spec, manifest)
    return out


def _layer_bytes(directory: Path, layer: int) -> int:
    layer_shapes(directory, layer)  # validates the header (truncated files fail here, naming the file)
    return os.path.getsize(directory / layer_file(layer))


def _shard_groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive layers grouped into shards of at most `limit` bytes (at least one layer each)."""
    groups: list[list[int]] = [[]]
    used = 0
    for layer, size in enumerate(sizes):
        if groups[-1] and used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    return groups


def write_hf_side_files(directory: Path, out: Path, spec: ModelSpec, manifest: Manifest) -> None:
    """config.json (architecture, dtype), generation_config.json (eos/pad) and the tokenizer with
    the training prompt template as its chat_template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(directory))
    config.architectures = [spec.family.hf_architecture[spec.model_type]]
    config.dtype = getattr(torch, manifest.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    template_path = directory / TEMPLATE_FILE
    if template_path.is_file():
        from data import chat_template_for, load_template  # only exports of trained models need data/

        tokenizer.chat_template = chat_template_for(load_template(template_path), tokenizer)
        shutil.copyfile(template_path, out / TEMPLATE_FILE)  # so further training renders alike
    tokenizer.save_pretrained(str(out))
    gen_path = directory / "generation_config.json"
    generation = (GenerationConfig.from_pretrained(str(directory)) if gen_path.is_file()
                  else GenerationConfig.from_model_config(config))
    _set_special_ids(generation, config, tokenizer)
    config.save_pretrained(str(out))
    generation.save_pretrained(str(out))


def _set_special_ids(generation: object, config: object, tokenizer: object) -> None:
    """Generation stops at the end-of-turn token the samples were trained with (the tokenizer's
    eos), and pads with pad (or eos when the tokenizer has none)."""
    eos = tokenizer.eos_token_id
    if eos is not None:
        existing = generation.eos_token_id
        ids = existing if isinstance(existing, list) else ([existing] if existing is not None else [])
        generation.eos_token_id = eos if not ids or ids == [eos] else sorted({eos, *ids})
        config.eos_token_id = config.eos_token_id if config.eos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generation.pad_token_id = pad
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
