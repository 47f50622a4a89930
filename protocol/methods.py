"""The method table of the contract: each method's params and result types and where it runs.

`runs_in="worker"` marks the long jobs that run in worker processes behind the bounded job queue;
`debug=True` methods exist only when the sidecar is started with `--debug`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from protocol import messages as m


class MethodContract(NamedTuple):
    params: type[m.Params]
    result: type
    runs_in: Literal["sidecar", "worker"]
    summary: str
    debug: bool = False


METHODS: dict[str, MethodContract] = {
    "initialize": MethodContract(m.InitializeParams, m.InitializeResult, "sidecar", "Negotiate the protocol version and learn the sidecar's capabilities."),
    "ping": MethodContract(m.Empty, m.EmptyResult, "sidecar", "Liveness check, answered promptly even while jobs compute."),
    "status": MethodContract(m.Empty, m.StatusResult, "sidecar", "Running and queued jobs, loaded models with their memory, the pool's budget."),
    "shutdown": MethodContract(m.Empty, m.ShutdownResult, "sidecar", "Stop accepting work and cancel running jobs; the process exits when stdin closes."),
    "models/list": MethodContract(m.Empty, m.ModelsListResult, "sidecar", "Models loaded in the pool."),
    "models/load": MethodContract(m.ModelsLoadParams, m.ModelInfo, "sidecar", "Load (warm) a model into the pool, with progress."),
    "models/unload": MethodContract(m.ModelsUnloadParams, m.ModelsUnloadResult, "sidecar", "Unload a model from the pool (waits until no request uses it)."),
    "generate": MethodContract(m.GenerateParams, m.GenerateResult, "sidecar", "Generate text from a prompt or chat messages, streaming $/token events."),
    "embed": MethodContract(m.EmbedParams, m.EmbedResult, "sidecar", "Embed one text or many, with the model's pooling."),
    "artifacts/list": MethodContract(m.ArtifactsListParams, m.ArtifactsListResult, "sidecar", "Artifacts in the registry, newest first."),
    "artifacts/get": MethodContract(m.ArtifactsGetParams, m.Artifact, "sidecar", "One artifact of the registry by id."),
    "train": MethodContract(m.TrainParams, m.TrainResult, "worker", "Fine-tune a model (LoRA, DoRA, QLoRA or full) on a dataset, with progress, checkpoints and resume."),
    "datasets/inspect": MethodContract(m.DatasetsInspectParams, m.DatasetsInspectResult, "worker", "Detect a dataset's format, count its rows and tokens, show rendered samples and list its problems."),
    "merge_lora": MethodContract(m.MergeLoraParams, m.MergeLoraResult, "worker", "Fold PEFT LoRA/DoRA adapters (each with a weight) into the base model and verify the merge."),
    "export": MethodContract(m.ExportParams, m.ExportResult, "worker", "Export a model (optionally with adapters, merged or beside it) to GGUF (with a Modelfile), Core ML or ONNX, with a model card."),
    "quantize": MethodContract(m.QuantizeParams, m.QuantizeResult, "worker", "Quantize a model: a GGUF type through llama.cpp, or Core ML palettization / linear quantization."),
    "benchmark": MethodContract(m.BenchmarkParams, m.BenchmarkResult, "worker", "Measure models side by side: llama-bench speed (pp/tg), latency, memory, perplexity, golden-transcript parity and embeddings, with history and significance."),
    "debug/sleep": MethodContract(m.DebugSleepParams, m.DebugSleepResult, "worker", "Diagnostic long job: sleeps in a worker with progress.", debug=True),
    "debug/stream": MethodContract(m.DebugStreamParams, m.DebugStreamResult, "sidecar", "Diagnostic: streams tokens from the sidecar process.", debug=True),
    "debug/crash": MethodContract(m.DebugCrashParams, m.EmptyResult, "worker", "Diagnostic: kills its own worker process.", debug=True),
    "debug/print": MethodContract(m.Empty, m.DebugPrintResult, "sidecar", "Diagnostic: writes to fd 1 from the sidecar and from a child process.", debug=True),
}

NOTIFICATIONS: dict[str, type] = {
    "$/progress": m.ProgressEvent,
    "$/token": m.TokenEvent,
    "$/log": m.LogEvent,
    "$/cancel": m.CancelParams,
}
