"""edge-adapt: adaptive inference-time compute for small local models on llama.cpp."""
