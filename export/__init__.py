"""edgeroute.export: checkpoint (folder, LoRA adapter or GGUF) -> verified edgeroute model folder.

torch, transformers and optimum are imported inside the functions, so importing this package is cheap and the
runtime never needs them. Install them with ``pip install 'edgeroute[export]'``.
"""

from .core import DEVICES, DTYPES, QUANTIZE, export_model
from .sources import TESTED_ARCHITECTURES

__all__ = ["DEVICES", "DTYPES", "QUANTIZE", "TESTED_ARCHITECTURES", "export_model"]
