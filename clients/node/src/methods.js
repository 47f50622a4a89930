// Generated from protocol/schema.json (protocol 2026-11-01) by protocol/codegen/typescript.py.
// Do not edit: change protocol/, then run `python -m protocol.schema` and `python -m protocol.codegen`.

/** The protocol version this client speaks; sent in `initialize`. */
export const PROTOCOL_VERSION = "2026-11-01";

/** Every method of the protocol: where it runs, whether it needs --debug, what it does. */
export const METHODS = Object.freeze({
  "artifacts/get": { runsIn: "sidecar", debugOnly: false, summary: "One artifact of the registry by id." },
  "artifacts/list": { runsIn: "sidecar", debugOnly: false, summary: "Artifacts in the registry, newest first." },
  "benchmark": { runsIn: "worker", debugOnly: false, summary: "Measure models side by side: llama-bench speed (pp/tg), latency, memory, perplexity, golden-transcript parity and embeddings, with history and significance." },
  "datasets/inspect": { runsIn: "worker", debugOnly: false, summary: "Detect a dataset's format, count its rows and tokens, show rendered samples and list its problems." },
  "debug/crash": { runsIn: "worker", debugOnly: true, summary: "Diagnostic: kills its own worker process." },
  "debug/print": { runsIn: "sidecar", debugOnly: true, summary: "Diagnostic: writes to fd 1 from the sidecar and from a child process." },
  "debug/sleep": { runsIn: "worker", debugOnly: true, summary: "Diagnostic long job: sleeps in a worker with progress." },
  "debug/stream": { runsIn: "sidecar", debugOnly: true, summary: "Diagnostic: streams tokens from the sidecar process." },
  "embed": { runsIn: "sidecar", debugOnly: false, summary: "Embed one text or many, with the model's pooling." },
  "export": { runsIn: "worker", debugOnly: false, summary: "Export a model (optionally with adapters, merged or beside it) to GGUF (with a Modelfile), Core ML or ONNX, with a model card." },
  "generate": { runsIn: "sidecar", debugOnly: false, summary: "Generate text from a prompt or chat messages, streaming $/token events." },
  "initialize": { runsIn: "sidecar", debugOnly: false, summary: "Negotiate the protocol version and learn the sidecar's capabilities." },
  "merge_lora": { runsIn: "worker", debugOnly: false, summary: "Fold PEFT LoRA/DoRA adapters (each with a weight) into the base model and verify the merge." },
  "models/list": { runsIn: "sidecar", debugOnly: false, summary: "Models loaded in the pool." },
  "models/load": { runsIn: "sidecar", debugOnly: false, summary: "Load (warm) a model into the pool, with progress." },
  "models/unload": { runsIn: "sidecar", debugOnly: false, summary: "Unload a model from the pool (waits until no request uses it)." },
  "ping": { runsIn: "sidecar", debugOnly: false, summary: "Liveness check, answered promptly even while jobs compute." },
  "quantize": { runsIn: "worker", debugOnly: false, summary: "Quantize a model: a GGUF type through llama.cpp, or Core ML palettization / linear quantization." },
  "shutdown": { runsIn: "sidecar", debugOnly: false, summary: "Stop accepting work and cancel running jobs; the process exits when stdin closes." },
  "status": { runsIn: "sidecar", debugOnly: false, summary: "Running and queued jobs, loaded models with their memory, the pool's budget." },
  "train": { runsIn: "worker", debugOnly: false, summary: "Fine-tune a model (LoRA, DoRA, QLoRA or full) on a dataset, with progress, checkpoints and resume." },
});

/** JSON-RPC and sidecar error codes, by name. */
export const ErrorCode = Object.freeze({
  BUSY: -32001,
  CANCELLED: -32800,
  INTERNAL_ERROR: -32603,
  INVALID_PARAMS: -32602,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  NOT_INITIALIZED: -32002,
  PARSE_ERROR: -32700,
  REQUEST_FAILED: -32803,
});

/** The values of `error.data.kind` in -32803 (request failed) errors. */
export const ERROR_KINDS = Object.freeze([
  "adapter_invalid",
  "adapter_mismatch",
  "artifact_exists",
  "artifact_not_found",
  "checkpoint_invalid",
  "dataset_invalid",
  "disk_full",
  "file_not_found",
  "input_empty",
  "input_too_long",
  "internal",
  "model_not_found",
  "no_chat_template",
  "out_of_memory",
  "path_not_allowed",
  "prompt_too_long",
  "registry_unavailable",
  "result_too_large",
  "shutting_down",
  "timeout",
  "unsupported_device",
  "unsupported_model",
  "verification_failed",
  "worker_crashed",
]);

/** One convenience method per protocol method; SidecarClient extends this and provides `call`. */
export class SidecarMethods {
  /** One artifact of the registry by id. */
  artifactsGet(params, options) {
    return this.call("artifacts/get", params, options);
  }

  /** Artifacts in the registry, newest first. */
  artifactsList(params, options) {
    return this.call("artifacts/list", params, options);
  }

  /**
   * Measure models side by side: llama-bench speed (pp/tg), latency, memory, perplexity, golden-transcript parity and embeddings, with history and significance.
   * Runs in a worker process, through the job queue.
   */
  benchmark(params, options) {
    return this.call("benchmark", params, options);
  }

  /**
   * Detect a dataset's format, count its rows and tokens, show rendered samples and list its problems.
   * Runs in a worker process, through the job queue.
   */
  datasetsInspect(params, options) {
    return this.call("datasets/inspect", params, options);
  }

  /**
   * Diagnostic: kills its own worker process.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  debugCrash(params, options) {
    return this.call("debug/crash", params, options);
  }

  /**
   * Diagnostic: writes to fd 1 from the sidecar and from a child process.
   * Only when the sidecar runs with --debug.
   */
  debugPrint(params, options) {
    return this.call("debug/print", params, options);
  }

  /**
   * Diagnostic long job: sleeps in a worker with progress.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  debugSleep(params, options) {
    return this.call("debug/sleep", params, options);
  }

  /**
   * Diagnostic: streams tokens from the sidecar process.
   * Only when the sidecar runs with --debug.
   */
  debugStream(params, options) {
    return this.call("debug/stream", params, options);
  }

  /** Embed one text or many, with the model's pooling. */
  embed(params, options) {
    return this.call("embed", params, options);
  }

  /**
   * Export a model (optionally with adapters, merged or beside it) to GGUF (with a Modelfile), Core ML or ONNX, with a model card.
   * Runs in a worker process, through the job queue.
   */
  export(params, options) {
    return this.call("export", params, options);
  }

  /** Generate text from a prompt or chat messages, streaming $/token events. */
  generate(params, options) {
    return this.call("generate", params, options);
  }

  /** Negotiate the protocol version and learn the sidecar's capabilities. */
  initialize(params, options) {
    return this.call("initialize", params, options);
  }

  /**
   * Fold PEFT LoRA/DoRA adapters (each with a weight) into the base model and verify the merge.
   * Runs in a worker process, through the job queue.
   */
  mergeLora(params, options) {
    return this.call("merge_lora", params, options);
  }

  /** Models loaded in the pool. */
  modelsList(params, options) {
    return this.call("models/list", params, options);
  }

  /** Load (warm) a model into the pool, with progress. */
  modelsLoad(params, options) {
    return this.call("models/load", params, options);
  }

  /** Unload a model from the pool (waits until no request uses it). */
  modelsUnload(params, options) {
    return this.call("models/unload", params, options);
  }

  /** Liveness check, answered promptly even while jobs compute. */
  ping(params, options) {
    return this.call("ping", params, options);
  }

  /**
   * Quantize a model: a GGUF type through llama.cpp, or Core ML palettization / linear quantization.
   * Runs in a worker process, through the job queue.
   */
  quantize(params, options) {
    return this.call("quantize", params, options);
  }

  /** Stop accepting work and cancel running jobs; the process exits when stdin closes. */
  shutdown(params, options) {
    return this.call("shutdown", params, options);
  }

  /** Running and queued jobs, loaded models with their memory, the pool's budget. */
  status(params, options) {
    return this.call("status", params, options);
  }

  /**
   * Fine-tune a model (LoRA, DoRA, QLoRA or full) on a dataset, with progress, checkpoints and resume.
   * Runs in a worker process, through the job queue.
   */
  train(params, options) {
    return this.call("train", params, options);
  }
}
