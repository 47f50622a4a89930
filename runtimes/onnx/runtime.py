"""The pool's `onnxruntime` runtime: ONNX artifacts (a directory holding model.onnx and its tokenizer).

Encoders serve `embed` the way runtimes/hf/embeddings.py does (tokenized once, sorted by length,
batched, padded per batch, pooled with the mask); the graph's own sentence_embedding is used when the
request asks for the pooling it was exported with, normalized. Decoders serve `generate` with our own
loop over the graph's KV cache (first call with an empty past), sampling as the transformers runtime
does (runtimes/hf/sampling.py), so one seed gives one text on either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import ProgressFn, UnsupportedModel
from runtimes.hf.text_face import HfTextFace

MODEL_FILE = "model.onnx"


def model_dir(path: Path) -> Path:
    """The artifact directory of a path: the directory itself, or the one a .onnx file lies in."""
    return path.parent if path.suffix == ".onnx" else path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class OnnxModel(HfTextFace):
    session: Any
    tokenizer: Any
    config: dict[str, Any]
    path: Path
    device: str
    dtype: str
    memory_bytes: int
    is_causal_lm: bool
    pooling: str | None  # what sentence_embedding was exported with
    inputs: list[str]
    outputs: list[str]
    generation: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    # ----- embed

    def embed(self, texts: list[str], *, pooling: str | None, normalize: bool, truncate: bool, batch_size: int,
              cancelled: Any) -> tuple[Any, int, str]:
        """(float32 vectors in input order, real tokens, pooling used)."""
        import numpy as np

        from protocol.errors import Cancelled
        from runtimes.hf.embeddings import EmptyInput, InputTooLong, POOLINGS, tokenize
        from runtimes.hf.lm import TextEmpty, TextTooLong

        if self.is_causal_lm or "last_hidden_state" not in self.outputs:
            raise UnsupportedModel(f"{self.path} is an ONNX decoder; embed needs an encoder export "
                                   "(last_hidden_state, sentence_embedding)", path=str(self.path))
        chosen = pooling or self.pooling or "mean"
        if chosen not in POOLINGS:
            raise ValueError(f"unknown pooling {chosen!r}; expected one of {POOLINGS}")
        try:
            ids = tokenize(self.tokenizer, texts, truncate=truncate, max_length=self.max_length)
        except InputTooLong as exc:
            raise TextTooLong(str(exc) + "; shorten it or pass truncate: true", index=exc.index, tokens=exc.tokens,
                              max_length=exc.max_length) from None
        except EmptyInput as exc:
            raise TextEmpty(f"text {exc.index} has no tokens for this model's tokenizer; drop it or add some text",
                            index=exc.index) from None
        lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        pad = next((v for v in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if isinstance(v, int)), 0)
        baked = chosen == self.pooling and normalize
        wanted = ["sentence_embedding"] if baked else ["last_hidden_state"]
        out: np.ndarray | None = None
        done = 0
        for start in range(0, len(order), batch_size):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled({"done": done})
            chosen_rows = order[start:start + batch_size]
            width = int(lengths[chosen_rows[0]])
            input_ids = np.full((len(chosen_rows), width), pad, dtype=np.int64)
            mask = np.zeros((len(chosen_rows), width), dtype=np.int64)
            for row, index in enumerate(chosen_rows):
                input_ids[row, :lengths[index]] = ids[index]
                mask[row, :lengths[index]] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            if "token_type_ids" in self.inputs:
                feeds["token_type_ids"] = np.zeros_like(input_ids)
            result = self.session.run(wanted, feeds)[0]
            vectors = result if baked else _pool(result, mask, chosen)
            if normalize and not baked:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[chosen_rows] = vectors
            done += len(chosen_rows)
        assert out is not None
        return out, int(lengths.sum()), chosen

    @property
    def max_length(self) -> int | None:
        from runtimes.hf.embeddings import resolve_max_length

        limit = resolve_max_length(self.tokenizer, None, self.path)
        positions = self.config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            return min(limit, positions) if limit else positions
        return limit

    # ----- generate (the text face is runtimes/hf/text_face.py's, as for TransformersModel)

    def stop_ids(self) -> set[int]:
        return self.eos_ids(self.generation.get("eos_token_id"))

    def stream(self, prompt_ids: list[int], sampling: Any, max_tokens: int, adapters: list[tuple[Path, float]],
               cancelled: Any) -> Any:
        """Yield token ids; the past the graph returns is fed back at every step."""
        import numpy as np
        import torch

        from runtimes.hf.sampling import choose_token
        from runtimes.onnx.validate import empty_past, presents_to_past

        if adapters:
            raise UnsupportedModel("an ONNX graph holds its weights: export with the adapters merged "
                                   "(export format onnx, adapters, merge: true) instead of passing adapters here")
        if not self.is_causal_lm:
            raise UnsupportedModel(f"{self.path} is an ONNX encoder; use embed with it", path=str(self.path))
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        history = list(prompt_ids)
        names = self.outputs
        n = len(prompt_ids)
        feeds = {"input_ids": np.array([prompt_ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None], **empty_past(self.session, 1)}
        out = self.session.run(None, feeds)
        for step in range(1, max_tokens + 1):
            token = choose_token(torch.from_numpy(out[0][0, -1]), history, sampling, generator)
            yield token
            if step == max_tokens or (cancelled is not None and cancelled.is_set()):
                return
            history.append(token)
            total = len(history)
            feeds = {"input_ids": np.array([[token]], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64),
                     "position_ids": np.array([[total - 1]], dtype=np.int64), **presents_to_past(names, out)}
            out = self.session.run(None, feeds)

    def close(self) -> None:
        self.session = None
        self.tokenizer = None


def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    import numpy as np

    rows = np.arange(hidden.shape[0])
    if pooling == "mean":
        weights = mask[..., None].astype(hidden.dtype)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    if pooling == "cls":
        return hidden[rows, mask.argmax(axis=1)]
    return hidden[rows, mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)]  # last real token


class OnnxRuntime:
    name = "onnxruntime"

    def can_load(self, path: Path) -> bool:
        return (model_dir(path) / MODEL_FILE).is_file()

    def estimate_bytes(self, path: Path, options: dict[str, Any]) -> int:
        home = model_dir(path)
        return sum(p.stat().st_size for p in home.iterdir() if p.name.startswith(MODEL_FILE) and p.is_file())

    def load(self, path: Path, options: dict[str, Any], progress: ProgressFn) -> OnnxModel:
        home = model_dir(path)
        if not (home / MODEL_FILE).is_file():
            raise UnsupportedModel(f"{path} holds no {MODEL_FILE}: the onnxruntime runtime loads ONNX exports "
                                   "(export format onnx)", path=str(path))
        progress(0, 3, "importing onnxruntime")
        import onnxruntime as ort
        import transformers

        requested = options.get("device") or "auto"
        available = ort.get_available_providers()
        if requested.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise UnsupportedModel(f"device {requested!r}: this onnxruntime has no CUDA provider ({', '.join(available)})",
                                   device=requested, providers=available)
        use_cuda = requested.startswith("cuda") or (requested == "auto" and "CUDAExecutionProvider" in available)
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if options.get("n_threads"):
            session_options.intra_op_num_threads = int(options["n_threads"])
        progress(1, 3, f"creating the onnxruntime session ({providers[0]})")
        session = ort.InferenceSession(str(home / MODEL_FILE), session_options, providers=providers)
        progress(2, 3, "loading tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(home, local_files_only=True,
                                                               trust_remote_code=bool(options.get("trust_remote_code")))
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        manifest = _read_json(home / "manifest.json")
        pooling = manifest.get("pooling")
        if pooling is None and "sentence_embedding" in outputs:
            from runtimes.hf.embeddings import default_pooling

            pooling = default_pooling(home, False)
        progress(3, 3, "loaded")
        return OnnxModel(session, tokenizer, _read_json(home / "config.json"), home, "cuda" if use_cuda else "cpu",
                         "int8" if manifest.get("quantization") == "int8" else "float32",
                         self.estimate_bytes(home, options), "logits" in outputs, pooling, inputs, outputs,
                         _read_json(home / "generation_config.json"))
