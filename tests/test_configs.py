"""Every shipped config validates, and its parts fit the model it is written for."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import BloomConfig, LlamaConfig

from models.partition import resolve_parts
from models.spec import layer_costs, spec_from_config
from training.config import batch_shape, load_config
from training.optim import check_deepspeed_keys

REPO = Path(__file__).resolve().parents[1]

# The published architectures (no weights needed): what each example config is written for.
MODELS = {
    "bloom7b_8gpu.json": BloomConfig(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880),
    "llama7b_8gpu.json": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, vocab_size=32000),
    "llama13b_2nodes.json": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                        num_attention_heads=40, vocab_size=32000),
    "llama13b_lion_8gpu.json": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                           num_attention_heads=40, vocab_size=32000),
    "llama70b_4nodes.json": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "tiny_cpu.json": LlamaConfig.from_pretrained(str(REPO / "configs" / "tiny-llama")),
}


def test_every_shipped_config_is_covered() -> None:
    assert sorted(p.name for p in (REPO / "configs").glob("*.json")) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_validates_for_its_model(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    check_deepspeed_keys(cfg.ds, cuda=name != "tiny_cpu.json")
    shape = batch_shape(cfg.ds, cfg.topology.data)
    assert shape.global_rows >= shape.micro
    spec = spec_from_config(MODELS[name])
    parts = resolve_parts(cfg.topology.parts, costs=layer_costs(spec, seq_len=cfg.max_seq_len,
                                                                 grad_ckpt=cfg.use_grad_ckpt),
                          num_stages=cfg.topology.pipe)
    assert sum(parts) == spec.num_layers and min(parts) >= 1


def test_seed_split_for_bloom_7b() -> None:
    assert load_config(REPO / "configs" / "bloom7b_8gpu.json").topology.parts == [1, 5, 5, 5, 5, 5, 5, 1]


def test_hostfile_example_matches_the_two_node_config() -> None:
    slots = [int(line.split("slots=")[1]) for line in (REPO / "hostfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    topo = load_config(REPO / "configs" / "llama13b_2nodes.json").topology
    assert sum(slots) == topo.pipe * topo.data
