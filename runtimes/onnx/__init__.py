"""ONNX: export Hugging Face decoders (with KV cache) and encoders, validate them with onnxruntime, and run them.

export.py writes the graph with torch.onnx (dynamo), validate.py measures it against torch, quantize.py
applies onnxruntime's dynamic int8 quantization, runtime.py is the pool's `onnxruntime` runtime.
Heavy libraries are imported inside the functions.
"""
