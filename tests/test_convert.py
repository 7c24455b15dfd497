"""hg_to_pp / pp_to_hg: bit-exact round trips, input layouts, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VARIANTS, build_hf_model, save_hf_model, save_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.common import ModelConfigError
from models.convert import ConversionError, hg_to_pp, pp_to_hg
from models.pipedir import MANIFEST, PipelineDirError, layer_file, read_manifest, resolve_pipeline_dir
from models.stack import LayerStack

REPO = Path(__file__).resolve().parents[1]


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    hf = save_hf_model(name, tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    back = pp_to_hg(str(pp), str(tmp_path / "back"), progress=False)

    before, after = load_all(tmp_path / "hf"), load_all(back)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key

    reloaded = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    ids = torch.randint(4, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)
    assert AutoTokenizer.from_pretrained(str(back)).eos_token is not None


def test_pipeline_dir_layout(tmp_path: Path) -> None:
    """One file per pipeline layer in the contract's order, a manifest, config and tokenizer."""
    save_hf_model("llama", tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    manifest = read_manifest(pp)
    assert (manifest.family, manifest.num_blocks, manifest.num_layers, manifest.tied) == ("llama", 2, 4, False)
    assert manifest.dtype == "float32"
    assert sorted(load_file(str(pp / layer_file(0)))) == ["embed.weight"]
    assert "attn.q_proj.weight" in load_file(str(pp / layer_file(1)))
    assert sorted(load_file(str(pp / layer_file(3)))) == ["lm_head.weight", "norm.weight"]
    assert (pp / "config.json").is_file() and (pp / "tokenizer.json").is_file()


def test_dtype_is_kept(tmp_path: Path) -> None:
    build_hf_model("qwen2").to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    save_tokenizer(tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    assert read_manifest(pp).dtype == "bfloat16"
    assert load_file(str(pp / layer_file(1)))["attn.q_proj.weight"].dtype == torch.bfloat16
    back = pp_to_hg(str(pp), str(tmp_path / "back"), progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_all(back).values())


def test_sharded_input_and_sharded_output(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    back = pp_to_hg(str(pp), str(tmp_path / "back"), progress=False)  # default: shards of <= one layer
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    before, after = load_all(tmp_path / "hf"), load_all(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    single = pp_to_hg(str(pp), str(tmp_path / "single"), max_shard_bytes=10**9, progress=False)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()


def test_pytorch_bin_input(tmp_path: Path) -> None:
    """.bin checkpoints are read with torch.load(weights_only=True)."""
    hf = save_hf_model("bloom", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    stack = LayerStack.from_pipeline_dir(pp)
    torch.testing.assert_close(stack.body[0].embed.weight, hf.transformer.word_embeddings.weight, rtol=0, atol=0)


def test_bloom_lm_head_copy_for_servers(tmp_path: Path) -> None:
    hf = save_hf_model("bloom", tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    back = pp_to_hg(str(pp), str(tmp_path / "back"), lm_head_copy=True, progress=False)
    weights = load_all(back)
    assert torch.equal(weights["lm_head.weight"], weights["transformer.word_embeddings.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(str(back)).eval()
    ids = torch.randint(4, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_command_line_contract(tmp_path: Path) -> None:
    save_hf_model("llama_tied", tmp_path / "hf")
    for cmd in (["hg_to_pp", "--input-path", str(tmp_path / "hf"), "--save-path", str(tmp_path / "pp")],
                ["pp_to_hg", "--input-path", str(tmp_path / "pp"), "--save-path", str(tmp_path / "back")]):
        done = subprocess.run([sys.executable, "convert_model.py", *cmd, "--quiet"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert load_all(tmp_path / "hf").keys() == load_all(tmp_path / "back").keys()


def test_training_save_path_resolves_to_newest_weights(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    for step in (5, 20):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "run" / "weights" / f"step_{step:08d}"), progress=False)
    incomplete = tmp_path / "run" / "weights" / "step_00000030"
    incomplete.mkdir()  # no manifest: an interrupted save is never picked
    assert resolve_pipeline_dir(tmp_path / "run") == tmp_path / "run" / "weights" / "step_00000020"


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_input_dir(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        hg_to_pp(str(tmp_path / "nope"), str(tmp_path / "pp"), progress=False)


def test_hub_name_without_hub_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub model name is fetched where the Hub is reachable; offline the error says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match=r"could not be fetched from the Hugging Face Hub.*pass the local directory"):
        hg_to_pp("someorg/some-model", str(tmp_path / "pp"), progress=False)


def test_unsupported_model_type_lists_supported(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(str(tmp_path / "g"))
    with pytest.raises(ModelConfigError, match=r"'gpt2' is not supported.*llama, mistral, qwen2, bloom"):
        hg_to_pp(str(tmp_path / "g"), str(tmp_path / "pp"), progress=False)


def test_truncated_safetensors_input(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConversionError, match="model.safetensors.*truncated or corrupt"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)


def test_weights_from_another_config(tmp_path: Path) -> None:
    """config.json says hidden 64; weights of another shape fail naming the HF key."""
    save_hf_model("llama", tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(32, 64)
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj.weight has shape \[32, 64\] but config.json implies \[96, 64\]"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)


def test_missing_and_unknown_keys(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    weights = load_file(str(path))
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, str(path))
    with pytest.raises(ConversionError, match=r"missing \['model.layers.0.mlp.down_proj.weight'\]"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 96)
    weights["model.layers.0.mlp.mystery.weight"] = torch.zeros(3)
    save_file(weights, str(path))
    with pytest.raises(ConversionError, match="'model.layers.0.mlp.mystery.weight' is not a known llama parameter"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)


def test_no_tokenizer(tmp_path: Path) -> None:
    build_hf_model("llama").save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="no tokenizer files.*tokenizer.save_pretrained"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)


def test_broken_pipeline_dirs(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    (pp / layer_file(2)).write_bytes((pp / layer_file(2)).read_bytes()[:300])
    with pytest.raises(PipelineDirError, match="layer_002.safetensors cannot be read.*truncated or corrupt"):
        LayerStack.from_pipeline_dir(pp)
    (pp / layer_file(2)).unlink()
    with pytest.raises(PipelineDirError, match="layer_002.safetensors is missing"):
        pp_to_hg(str(pp), str(tmp_path / "back"), progress=False)
    (pp / MANIFEST).unlink()
    with pytest.raises(PipelineDirError, match="no manifest.json.*hg_to_pp"):
        pp_to_hg(str(pp), str(tmp_path / "back"), progress=False)


def test_pipeline_layer_from_another_model(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    tensors = load_file(str(pp / layer_file(1)))
    tensors["attn.q_proj.weight"] = torch.zeros(8, 8)
    save_file(tensors, str(pp / layer_file(1)))
    with pytest.raises(PipelineDirError, match=r"layer_001.safetensors: attn.q_proj.weight has shape \[8, 8\]"):
        LayerStack.from_pipeline_dir(pp)


def test_save_path_that_is_not_a_model_dir_is_refused(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="exists and is not a model dir"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "precious"), progress=False)
    assert (tmp_path / "precious" / "notes.txt").exists()


def test_output_over_input_is_refused(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "hf")
    with pytest.raises(ConversionError, match="overlaps --input-path"):
        hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "hf"), progress=False)
    pp = hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), progress=False)
    with pytest.raises(ConversionError, match="overlaps --input-path"):
        pp_to_hg(str(pp), str(pp / "export"), progress=False)
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (pp / "manifest.json").is_file()


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "convert_model.py", "pp_to_hg", "--input-path", str(tmp_path / "x"),
                           "--save-path", str(tmp_path / "y")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: pipeline dir" in done.stderr and "Traceback" not in done.stderr
