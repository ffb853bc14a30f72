"""HF <-> GGUF conversion: model and adapter export, import back to transformers.

    convert_model(hf_dir, "model.gguf", type="q8_0")           # transformers checkpoint -> GGUF
    convert_adapter(peft_dir, base="model.gguf", out="a.gguf")  # PEFT LoRA / aLoRA -> GGUF adapter
    import_gguf("model.gguf", hf_dir)                           # GGUF (None: the default model) -> transformers
    import_adapter("a.gguf", base="model.gguf", out=peft_dir)   # GGUF adapter -> PEFT (for import_gguf's copy)

Each long one has a `*_job` twin that yields Progress events (edge_adapt.progress) and returns the same result.
"""

from edge_adapt.convert.adapter import AdapterResult, convert_adapter, convert_adapter_job, import_adapter
from edge_adapt.convert.importer import ImportResult, import_gguf, import_gguf_job
from edge_adapt.convert.model import TYPES, ConvertResult, convert_model, convert_model_job
from edge_adapt.convert.registry import supported_architectures

__all__ = [
    "convert_model", "convert_adapter", "import_adapter", "import_gguf", "supported_architectures", "TYPES",
    "convert_model_job", "convert_adapter_job", "import_gguf_job", "ConvertResult", "AdapterResult", "ImportResult",
]
