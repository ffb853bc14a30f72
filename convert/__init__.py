"""HF <-> GGUF conversion: model and adapter export, import back to transformers."""
