"""Methods that turn a model into another form: merge_lora, export (GGUF, Core ML, ONNX) and quantize."""
