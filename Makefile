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

quickstart: install
	$(BIN)/python -m models.init_hf --config configs/tiny-llama --save-path $(RUN)/hf
	$(BIN)/python convert_model.py hg_to_pp --input-path $(RUN)/hf --save-path $(RUN)/pp
	$(BIN)/python convert_model.py pp_to_hg --input-path $(RUN)/pp --save-path $(RUN)/export

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
