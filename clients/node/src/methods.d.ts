// Generated from protocol/schema.json (protocol 2026-11-01) by protocol/codegen/typescript.py.
// Do not edit: change protocol/, then run `python -m protocol.schema` and `python -m protocol.codegen`.

import type * as P from "./protocol.js";
import type { CallOptions } from "./index.js";

export interface MethodInfo {
  runsIn: "sidecar" | "worker";
  debugOnly: boolean;
  summary: string;
}

export declare const PROTOCOL_VERSION: P.ProtocolVersion;
export declare const METHODS: { readonly [M in P.MethodName]: MethodInfo };
export declare const ErrorCode: {
  readonly BUSY: -32001;
  readonly CANCELLED: -32800;
  readonly INTERNAL_ERROR: -32603;
  readonly INVALID_PARAMS: -32602;
  readonly INVALID_REQUEST: -32600;
  readonly METHOD_NOT_FOUND: -32601;
  readonly NOT_INITIALIZED: -32002;
  readonly PARSE_ERROR: -32700;
  readonly REQUEST_FAILED: -32803;
};
export declare const ERROR_KINDS: readonly P.ErrorKind[];

export declare abstract class SidecarMethods {
  /** Send a request and wait for its result; events go to `options.onEvent`. */
  abstract call<M extends P.MethodName>(method: M, params?: P.MethodParams<M>, options?: CallOptions): Promise<P.MethodResult<M>>;
  /** One artifact of the registry by id. */
  artifactsGet(params: P.ArtifactsGetParams, options?: CallOptions): Promise<P.Artifact>;
  /** Artifacts in the registry, newest first. */
  artifactsList(params?: P.ArtifactsListParams, options?: CallOptions): Promise<P.ArtifactsListResult>;
  /**
   * Measure models side by side: llama-bench speed (pp/tg), latency, memory, perplexity, golden-transcript parity and embeddings, with history and significance.
   * Runs in a worker process, through the job queue.
   */
  benchmark(params: P.BenchmarkParams, options?: CallOptions): Promise<P.BenchmarkResult>;
  /**
   * Detect a dataset's format, count its rows and tokens, show rendered samples and list its problems.
   * Runs in a worker process, through the job queue.
   */
  datasetsInspect(params: P.DatasetsInspectParams, options?: CallOptions): Promise<P.DatasetsInspectResult>;
  /**
   * Diagnostic: kills its own worker process.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  debugCrash(params?: P.DebugCrashParams, options?: CallOptions): Promise<P.EmptyResult>;
  /**
   * Diagnostic: writes to fd 1 from the sidecar and from a child process.
   * Only when the sidecar runs with --debug.
   */
  debugPrint(params?: P.Empty, options?: CallOptions): Promise<P.DebugPrintResult>;
  /**
   * Diagnostic long job: sleeps in a worker with progress.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  debugSleep(params?: P.DebugSleepParams, options?: CallOptions): Promise<P.DebugSleepResult>;
  /**
   * Diagnostic: streams tokens from the sidecar process.
   * Only when the sidecar runs with --debug.
   */
  debugStream(params?: P.DebugStreamParams, options?: CallOptions): Promise<P.DebugStreamResult>;
  /** Embed one text or many, with the model's pooling. */
  embed(params: P.EmbedParams, options?: CallOptions): Promise<P.EmbedResult>;
  /**
   * Export a model (optionally with adapters, merged or beside it) to GGUF (with a Modelfile), Core ML or ONNX, with a model card.
   * Runs in a worker process, through the job queue.
   */
  export(params: P.ExportParams, options?: CallOptions): Promise<P.ExportResult>;
  /** Generate text from a prompt or chat messages, streaming $/token events. */
  generate(params: P.GenerateParams, options?: CallOptions): Promise<P.GenerateResult>;
  /** Negotiate the protocol version and learn the sidecar's capabilities. */
  initialize(params: P.InitializeParams, options?: CallOptions): Promise<P.InitializeResult>;
  /**
   * Fold PEFT LoRA/DoRA adapters (each with a weight) into the base model and verify the merge.
   * Runs in a worker process, through the job queue.
   */
  mergeLora(params: P.MergeLoraParams, options?: CallOptions): Promise<P.MergeLoraResult>;
  /** Models loaded in the pool. */
  modelsList(params?: P.Empty, options?: CallOptions): Promise<P.ModelsListResult>;
  /** Load (warm) a model into the pool, with progress. */
  modelsLoad(params: P.ModelsLoadParams, options?: CallOptions): Promise<P.ModelInfo>;
  /** Unload a model from the pool (waits until no request uses it). */
  modelsUnload(params: P.ModelsUnloadParams, options?: CallOptions): Promise<P.ModelsUnloadResult>;
  /** Liveness check, answered promptly even while jobs compute. */
  ping(params?: P.Empty, options?: CallOptions): Promise<P.EmptyResult>;
  /**
   * Quantize a model: a GGUF type through llama.cpp, or Core ML palettization / linear quantization.
   * Runs in a worker process, through the job queue.
   */
  quantize(params: P.QuantizeParams, options?: CallOptions): Promise<P.QuantizeResult>;
  /** Stop accepting work and cancel running jobs; the process exits when stdin closes. */
  shutdown(params?: P.Empty, options?: CallOptions): Promise<P.ShutdownResult>;
  /** Running and queued jobs, loaded models with their memory, the pool's budget. */
  status(params?: P.Empty, options?: CallOptions): Promise<P.StatusResult>;
  /**
   * Fine-tune a model (LoRA, DoRA, QLoRA or full) on a dataset, with progress, checkpoints and resume.
   * Runs in a worker process, through the job queue.
   */
  train(params?: P.TrainParams, options?: CallOptions): Promise<P.TrainResult>;
}
