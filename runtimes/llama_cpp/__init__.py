"""The llama.cpp runtime (through llama-cpp-python): GGUF generation and embeddings."""
