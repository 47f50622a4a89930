"""The transformers/torch runtime: loading, our KV-cache decoding loop and sampling, unmerged adapters, embeddings."""
