# The two commands of the README, each working on a fresh machine:
#   make quickstart   install into .venv, then build, convert, train, export and chat with the tiny default
#   make test         install into .venv (with test tools), then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/quickstart
STAMP := $(VENV)/.installed

.PHONY: install quickstart test clean

# torch first, at the version pinned in requirements.txt (a CPU wheel where there is no CUDA);
# deepspeed is an sdist that builds against the installed torch, hence --no-build-isolation.
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(BIN)/python -m pip install --quiet --no-build-isolation -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The tiny shipped llama-family default, end to end on the CPU: a random HF checkpoint from the
# shipped config + tokenizer, split into pipeline files, trained on the shipped samples with a
# 2-stage pipeline, exported back to HF, and asked a question from the samples.
QUESTION ?= What is the capital of Zorbia?
EXPECT ?= Quillon
quickstart: install
	rm -rf $(RUN)
	$(BIN)/python -m models.init_hf --config configs/tiny-llama --save-path $(RUN)/hf
	$(BIN)/python convert_model.py hg_to_pp --input-path $(RUN)/hf --save-path $(RUN)/pp
	$(BIN)/deepspeed --num_gpus 2 train_ds.py --config configs/tiny_cpu.json \
		--set model_path=$(RUN)/pp save_path=$(RUN)/train
	$(BIN)/python convert_model.py pp_to_hg --input-path $(RUN)/train --save-path $(RUN)/model
	$(BIN)/deepspeed --num_gpus 2 demo.py --model $(RUN)/model --prompt "$(QUESTION)" --temperature 0 \
		--max-new-tokens 32 --output-json $(RUN)/answer.jsonl
	@$(BIN)/python -c "import json, sys; a = json.loads(open('$(RUN)/answer.jsonl').readlines()[-1])['text']; \
		ok = '$(EXPECT)' in a; print(('quickstart OK' if ok else 'quickstart FAILED') + ': asked \"$(QUESTION)\", the model answered ' + repr(a)); sys.exit(not ok)"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
