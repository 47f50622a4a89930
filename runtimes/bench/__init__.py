"""The `benchmark` method's measurements: llama-bench speed, perplexity, parity, statistics, charts."""
