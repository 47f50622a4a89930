"""GGUF for llama.cpp and Ollama: our Hugging Face -> GGUF writer and the PEFT LoRA -> GGUF LoRA converter."""
