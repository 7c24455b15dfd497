"""The export as inference sees it: pp_to_hg writes the training template as the tokenizer's
chat_template and a generation config that stops at the trained end-of-turn token, so that
apply_chat_template reproduces the training tokens, and demo.py's greedy answer equals
transformers' generate — on one rank and on two."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_trainable_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from data import DataSettings, load_rows, load_template, save_template
from models.convert import hg_to_pp, pp_to_hg

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of Zorbia?"


@pytest.fixture(scope="module", params=["llama", "bloom"])
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline dir as training writes it (with its prompt template), exported to HF."""
    root = tmp_path_factory.mktemp(request.param)
    hf = save_trainable_model(request.param, root / "hf", seed=3, initializer_range=0.2)
    pp = hg_to_pp(str(hf), str(root / "pp"), progress=False)
    save_template(load_template({"system": "You are a concise assistant."}), pp)
    return pp_to_hg(str(pp), str(root / "export"), progress=False)


def test_chat_template_reproduces_training_tokens(export: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Quillon."},
                {"role": "user", "content": "和首都有关的河流叫什么？"}, {"role": "assistant", "content": "Vesk."}]
    (tmp_path / "s.jsonl").write_text(json.dumps({"type": "messages", "messages": messages}, ensure_ascii=False) + "\n")
    template = load_template(export)  # the export keeps prompt_template.json too
    rows = load_rows(DataSettings(paths=str(tmp_path / "s.jsonl"), max_seq_len=256, template=template.to_dict()),
                     tokenizer)
    n = int((rows.segment_ids[0] > 0).sum())
    trained_ids = rows.input_ids[0, :n].tolist()
    inference_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert inference_ids == trained_ids
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Assistant:\n") and "You are a concise assistant." in prompt


def test_generation_config_stops_at_the_trained_end_of_turn(export: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    generation = GenerationConfig.from_pretrained(str(export))
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.eos_token_id in eos and generation.pad_token_id is not None


def transformers_greedy(export: Path, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run_demo(export: Path, out: Path, ranks: int) -> list[int]:
    args = ["demo.py", "--model", str(export), "--prompt", QUESTION, "--temperature", "0",
            "--max-new-tokens", "12", "--output-json", str(out)]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
               *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text().splitlines()[-1])["output_ids"]


def test_demo_greedy_equals_transformers_generate(export: Path, tmp_path: Path) -> None:
    reference = transformers_greedy(export, 12)
    assert len(set(reference)) > 1  # not a degenerate repetition of one token
    assert run_demo(export, tmp_path / "one.jsonl", ranks=1) == reference


@pytest.mark.multiproc
def test_demo_on_two_ranks_equals_one(export: Path, tmp_path: Path) -> None:
    assert run_demo(export, tmp_path / "two.jsonl", ranks=2) == transformers_greedy(export, 12)
