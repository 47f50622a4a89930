// Generated from protocol/schema.json (protocol 2026-11-01) by protocol/codegen/typescript.py.
// Do not edit: change protocol/, then run `python -m protocol.schema` and `python -m protocol.codegen`.
export type ProtocolVersion = "2026-11-01";

/** An unmerged PEFT LoRA adapter (a directory or a registry artifact id) applied with a weight. */
export interface AdapterRef {
  adapter: string;
  /** @default 1.0 */
  weight?: number;
}

export interface Artifact {
  created: number;
  id: string;
  kind: string;
  metrics: { [key: string]: unknown };
  name: string | null;
  params: { [key: string]: unknown };
  parents: string[];
  path: string;
  run_id: string | null;
  size_bytes: number;
  versions: { [key: string]: string };
}

export interface ArtifactsGetParams {
  id: string;
}

export interface ArtifactsListParams {
  kind?: string | null;
  /** @default 100 */
  limit?: number;
  parent?: string | null;
}

export interface ArtifactsListResult {
  artifacts: Artifact[];
}

/**
 * Against the last run of the same model and settings: percent change of the first pp and tg test and
 * whether any test changed significantly (Welch's t-test on the repetitions, two-sided p < 0.05).
 */
export interface BenchmarkChange {
  note?: string | null;
  pp_pct: number | null;
  previous_created: number;
  previous_run: string;
  significant: boolean;
  tests: BenchmarkChangeTest[];
  tg_pct: number | null;
}

export interface BenchmarkChangeTest {
  p_value: number | null;
  pct: number;
  previous_mean_tps: number;
  significant: boolean;
  test: string;
}

/**
 * Texts to embed (a list, or a UTF-8 file with one text per line); compared with the golden reference's
 * embeddings, or the first model's.
 */
export interface BenchmarkEmbed {
  /** @default 32 */
  batch_size?: number;
  texts: string | string[];
}

export interface BenchmarkEmbedResult {
  cosine_mean: number | null;
  cosine_min: number | null;
  dimensions: number;
  per_s: number;
  reference: string;
  texts: number;
}

export interface BenchmarkError {
  code: number;
  kind: string;
  message: string;
}

export interface BenchmarkFiles {
  chart_png: string | null;
  report_json: string;
  report_md: string;
}

/**
 * Golden transcripts: `reference` (a label of `models` or a model reference) decodes each prompt greedily
 * for `tokens` tokens; every model is compared free-running and teacher-forced along those tokens.
 */
export interface BenchmarkGolden {
  prompts: string[];
  reference: string;
  /** @default 64 */
  tokens?: number;
}

/**
 * Time to first token (a prompt of the first pp length, then the first token chosen), and the
 * per-token decode latency percentiles over every tg step of every repetition.
 */
export interface BenchmarkLatency {
  p50_ms: number | null;
  p90_ms: number | null;
  p99_ms: number | null;
  ttft_ms: number | null;
}

/**
 * The machine while the row was measured: CPU time other processes used (in CPUs), the load average,
 * and whether that was enough to slow the numbers (`busy`).
 */
export interface BenchmarkMachine {
  busy: boolean;
  cpus: number;
  foreign_cpus: number | null;
  load_avg_1m: number | null;
  note: string | null;
}

/**
 * One model of a benchmark; `label` names its row (default: the reference). Adapters are unmerged PEFT
 * adapters on transformers; `device` and `dtype` as for models/load.
 */
export interface BenchmarkModel {
  /** @default [] */
  adapters?: AdapterRef[];
  /** @default "auto" */
  device?: string;
  /** @default "auto" */
  dtype?: "auto" | "bfloat16" | "float16" | "float32";
  label?: string | null;
  model: string;
  /** @default "auto" */
  runtime?: "auto" | "llama.cpp" | "onnxruntime" | "transformers";
}

/**
 * Speed as llama-bench measures it (pp: one batch of N random prompt tokens; tg: N random tokens decoded one
 * at a time from an empty context), for every model in its own process, with the same threads, OpenMP wait
 * policy and batch sizes; plus perplexity, golden-transcript parity and embeddings when asked.
 */
export interface BenchmarkParams {
  /** @default 2048 */
  batch_size?: number;
  embed?: BenchmarkEmbed | null;
  gen_tokens?: number[];
  golden?: BenchmarkGolden | null;
  models: BenchmarkModel[];
  name?: string | null;
  /** @default "inherit" */
  omp_wait_policy?: "active" | "inherit" | "passive";
  output?: string | null;
  perplexity?: BenchmarkPerplexity | null;
  prompt_tokens?: number[];
  /** @default 5 */
  repetitions?: number;
  /** @default 1234 */
  seed?: number;
  threads?: number | null;
  /** @default 512 */
  ubatch_size?: number;
  /** @default 1 */
  warmup?: number;
}

export interface BenchmarkParity {
  identical: number;
  mean_top1_agreement: number;
  prompts: BenchmarkParityPrompt[];
  reference: string;
}

/**
 * `first_divergence`: the index of the first generated token that differs from the reference's (null:
 * none in `tokens`); `top1_agreement`: the fraction of positions whose top-1 is the reference's token, fed
 * the reference's tokens.
 */
export interface BenchmarkParityPrompt {
  first_divergence: number | null;
  prompt: number;
  same_prompt_tokens: boolean;
  tokens: number;
  top1_agreement: number;
}

/**
 * Perplexity on a UTF-8 text file. `sliding`: windows of `context` tokens every `stride` tokens, each
 * scoring only the tokens the previous window did not reach; `chunks`: llama-perplexity's non-overlapping
 * chunks of `context` tokens, the second half of each scored. `max_tokens` keeps only the text's first tokens.
 */
export interface BenchmarkPerplexity {
  /** @default 512 */
  context?: number;
  data: string;
  max_tokens?: number | null;
  /** @default "sliding" */
  method?: "chunks" | "sliding";
  /** @default 256 */
  stride?: number;
}

export interface BenchmarkPerplexityResult {
  context: number;
  method: string;
  nll: number;
  ppl: number;
  scored: number;
  stride: number | null;
  tokens: number;
}

export interface BenchmarkResult {
  artifact: Artifact;
  files: BenchmarkFiles;
  markdown: string;
  rows: BenchmarkRow[];
  seconds: number;
  settings: BenchmarkSettings;
}

export interface BenchmarkRow {
  adapters: string[];
  change: BenchmarkChange | null;
  device: string | null;
  dtype: string | null;
  embed: BenchmarkEmbedResult | null;
  error: BenchmarkError | null;
  gpu_memory_bytes: number | null;
  key: string;
  label: string;
  latency: BenchmarkLatency | null;
  load_s: number | null;
  machine: BenchmarkMachine | null;
  model: string;
  parity: BenchmarkParity | null;
  path: string | null;
  peak_rss_bytes: number | null;
  perplexity: BenchmarkPerplexityResult | null;
  runtime: string | null;
  settings: BenchmarkSettings;
  size_bytes: number | null;
  speed: BenchmarkSpeed[];
  status: "failed" | "ok";
}

/** What every row was measured with (identical for all models of a run). */
export interface BenchmarkSettings {
  batch_size: number;
  gen_tokens: number[];
  omp_wait_policy: string;
  prompt_tokens: number[];
  repetitions: number;
  seed: number;
  threads: number;
  ubatch_size: number;
  warmup: number;
}

/** One llama-bench test: `pp512` or `tg128`; tokens/s per repetition, their mean and sample std. */
export interface BenchmarkSpeed {
  kind: "pp" | "tg";
  mean_tps: number;
  samples_tps: number[];
  std_tps: number;
  test: string;
  tokens: number;
}

/** `$/cancel` (host -> sidecar): unknown or finished ids are ignored. */
export interface CancelParams {
  id: number | string;
}

export interface ChatMessage {
  content: string;
  role: string;
}

export interface ClientCapabilities {
  /** @default false */
  allowNetwork?: boolean;
}

export interface ClientInfo {
  name: string;
  version?: string | null;
}

/** Core ML weight compression: k-means palettization (`nbits`) or linear quantization (`dtype`). */
export interface CoreMLQuantization {
  block_size?: number | null;
  dtype?: "int4" | "int8" | null;
  granularity?: "per_block" | "per_channel" | "per_grouped_channel" | "per_tensor" | null;
  group_size?: number | null;
  mode: "linear" | "palettize";
  nbits?: number | null;
  /** @default [] */
  overrides?: CoreMLQuantizationOverride[];
}

/** Mixed precision: settings for the ops of one type or one name (`skip` leaves them uncompressed). */
export interface CoreMLQuantizationOverride {
  block_size?: number | null;
  dtype?: "int4" | "int8" | null;
  granularity?: "per_block" | "per_channel" | "per_grouped_channel" | "per_tensor" | null;
  group_size?: number | null;
  mode?: "linear" | "palettize" | null;
  nbits?: number | null;
  op_name?: string | null;
  op_type?: string | null;
  /** @default false */
  skip?: boolean;
}

export interface DatasetProblem {
  reason: string;
  row: number;
}

/**
 * A dataset file and how to read it; `columns` maps our field names to the file's own
 * (for example {"prompt": "question", "completion": "answer"} or {"messages": "dialog"}).
 */
export interface DatasetRef {
  /** @default {} */
  columns?: { [key: string]: string };
  /** @default "auto" */
  file_type?: "auto" | "csv" | "json" | "jsonl" | "parquet" | "tsv";
  /** @default "auto" */
  format?: "alpaca" | "auto" | "chat" | "completions" | "sharegpt" | "text";
  path: string;
}

export interface DatasetSample {
  rendered: string;
  row: number;
  tokens: number | null;
  trained_tokens: number | null;
}

export interface DatasetsInspectParams {
  chat_template?: string | null;
  data: string | DatasetRef;
  /** @default 2048 */
  max_seq_length?: number;
  model?: string | null;
  /** @default 3 */
  samples?: number;
  /** @default false */
  strict?: boolean;
}

export interface DatasetsInspectResult {
  file_type: string;
  format: string;
  path: string;
  problem_count: number;
  problems: DatasetProblem[];
  rows: number;
  samples: DatasetSample[];
  sha256: string;
  tokens: TokenStats | null;
  valid_rows: number;
}

/** Kills its own worker process in the chosen way, to prove the sidecar survives it. */
export interface DebugCrashParams {
  /** @default 0.0 */
  after_s?: number;
  /** @default "sigkill" */
  mode?: "exit" | "memory_error" | "raise" | "segfault" | "sigkill";
}

export interface DebugPrintResult {
  wrote: string[];
}

/** A long job in a worker process that sleeps in `steps` slices, reporting progress. */
export interface DebugSleepParams {
  fail?: string | null;
  /** @default 1.0 */
  seconds?: number;
  /** @default 10 */
  steps?: number;
  /** @default false */
  write_stdout?: boolean;
}

export interface DebugSleepResult {
  pid: number;
  slept_s: number;
  steps: number;
}

/** Streams `count` tokens from inside the sidecar, as generation will. */
export interface DebugStreamParams {
  /** @default 100 */
  count?: number;
  /** @default 0.0 */
  delay_ms?: number;
  /** @default "tok " */
  text?: string;
}

export interface DebugStreamResult {
  count: number;
  text: string;
}

/** Data-parallel training in `processes` local processes (PyTorch DDP; gloo on CPU, NCCL on GPUs). */
export interface DistributedOptions {
  /** @default "auto" */
  backend?: "auto" | "gloo" | "nccl";
  /** @default 1 */
  processes?: number;
}

export interface EmbedParams {
  /** @default 32 */
  batch_size?: number;
  /** @default "float" */
  encoding?: "base64" | "float";
  input: string | string[];
  keep_alive?: string | number | null;
  model: string;
  /** @default true */
  normalize?: boolean;
  options?: LoadOptions;
  pooling?: "cls" | "last" | "mean" | null;
  /** @default "auto" */
  runtime?: "auto" | "llama.cpp" | "onnxruntime" | "transformers";
  /** @default true */
  truncate?: boolean;
}

/**
 * `embeddings` holds float lists or base64 strings (little-endian float32), one per input,
 * unless the result would exceed maxMessageBytes: then it is null and `path` names a .npy file.
 */
export interface EmbedResult {
  count: number;
  dimensions: number;
  embeddings: (number[] | string)[] | null;
  encoding: string;
  model: string;
  normalized: boolean;
  path: string | null;
  pooling: string;
  runtime: string;
  timings: { [key: string]: number };
  usage: EmbedUsage;
}

export interface EmbedUsage {
  prompt_tokens: number;
}

export type Empty = Record<string, never>;

export type EmptyResult = Record<string, never>;

export interface ErrorObject {
  code: number;
  data?: { [key: string]: unknown } | null;
  message: string;
}

/**
 * `output` is the directory the export makes (left out: a new one under the home, named by `name`).
 * `quantization` is a GGUF type name for gguf, a CoreMLQuantization for coreml, "int8" (dynamic) for onnx;
 * `context_length`, `prefill_length` and `functions` apply to coreml only.
 */
export interface ExportParams {
  /** @default [] */
  adapters?: AdapterRef[];
  context_length?: number | null;
  format: "coreml" | "gguf" | "onnx";
  functions?: ("decode" | "embed" | "prefill")[] | null;
  /** @default false */
  merge?: boolean;
  model: string;
  /** @default true */
  modelfile?: boolean;
  name?: string | null;
  options?: LoadOptions;
  output?: string | null;
  /** @default "auto" */
  outtype?: "auto" | "bf16" | "f16" | "f32" | "q8_0";
  prefill_length?: number | null;
  quantization?: string | CoreMLQuantization | null;
  system?: string | null;
}

export interface ExportResult {
  artifact: Artifact;
  files: ExportedFile[];
  format: string;
  outtype: string;
  path: string;
  quantization: string | null;
  quantization_report?: { [key: string]: unknown } | null;
  seconds: number;
  spec?: { [key: string]: unknown } | null;
  validation?: { [key: string]: unknown } | null;
  /** @default [] */
  warnings?: string[];
}

export interface ExportedFile {
  path: string;
  role: "adapter" | "model" | "model_card" | "modelfile" | "other" | "tokenizer";
  size_bytes: number;
}

export interface GenerateParams {
  /** @default [] */
  adapters?: AdapterRef[];
  /** @default true */
  add_generation_prompt?: boolean;
  chat_template?: string | null;
  /** @default false */
  ignore_eos?: boolean;
  keep_alive?: string | number | null;
  /** @default 256 */
  max_tokens?: number;
  messages?: ChatMessage[] | null;
  /** @default 0.05 */
  min_p?: number;
  model: string;
  options?: LoadOptions;
  prompt?: string | null;
  /** @default 64 */
  repeat_last_n?: number;
  /** @default 1.0 */
  repeat_penalty?: number;
  /** @default "auto" */
  runtime?: "auto" | "llama.cpp" | "onnxruntime" | "transformers";
  seed?: number | null;
  /** @default [] */
  stop?: string[];
  /** @default true */
  stream?: boolean;
  /** @default 0.0 */
  stream_interval_ms?: number;
  /** @default 0.8 */
  temperature?: number;
  /** @default 40 */
  top_k?: number;
  /** @default 0.95 */
  top_p?: number;
  /** @default false */
  truncate?: boolean;
}

export interface GenerateResult {
  finish_reason: "cancelled" | "length" | "stop";
  model: string;
  runtime: string;
  seed: number | null;
  text: string;
  timings: Timings;
  usage: Usage;
}

export interface InitializeParams {
  capabilities?: ClientCapabilities | null;
  clientInfo?: ClientInfo | null;
  processId?: number | null;
  protocolVersion: string;
}

export interface InitializeResult {
  capabilities: ServerCapabilities;
  protocolVersion: string;
  serverInfo: ServerInfo;
}

export interface JobInfo {
  id: number | string;
  method: string;
  pid: number | null;
  position: number | null;
  stage: string | null;
  started: number | null;
  state: "queued" | "running";
  step: number | null;
  total: number | null;
}

/** Options that change what is loaded; two loads with different options are different pool entries. */
export interface LoadOptions {
  /** @default false */
  allow_pickle?: boolean;
  /** @default "auto" */
  device?: string;
  /** @default "auto" */
  dtype?: "auto" | "bfloat16" | "float16" | "float32";
  lora_path?: string | null;
  /** @default 1.0 */
  lora_scale?: number;
  n_ctx?: number | null;
  n_gpu_layers?: number | null;
  n_threads?: number | null;
  /** @default false */
  trust_remote_code?: boolean;
}

/** `$/log`: something the host should show its user (a fallback taken, a row skipped). */
export interface LogEvent {
  data?: { [key: string]: unknown } | null;
  id: number | string;
  level: "debug" | "error" | "info" | "warning";
  message: string;
}

/** Fold one or more PEFT LoRA/DoRA adapters, each with its weight, into the base model's weights. */
export interface MergeLoraParams {
  adapters: AdapterRef[];
  /** @default "auto" */
  dtype?: "auto" | "bf16" | "f16" | "f32";
  model: string;
  name?: string | null;
  options?: LoadOptions;
  output?: string | null;
  /** @default true */
  verify?: boolean;
}

export interface MergeLoraResult {
  artifact: Artifact;
  merged_tensors: number;
  seconds: number;
  tensors: number;
  verification: MergeVerification | null;
}

/** The merged model against the base with the adapters attached unmerged, on a few probe prompts. */
export interface MergeVerification {
  dtype: string;
  max_abs_logit_diff: number;
  probes: number;
}

export interface MethodInfo {
  cancellable: boolean;
  runs_in: "sidecar" | "worker";
}

export interface ModelInfo {
  /** @default [] */
  adapters?: string[];
  device: string;
  dtype: string;
  expires_at: number | null;
  in_use: number;
  keep_alive_s: number | null;
  loaded_at: number;
  memory_bytes: number;
  model: string;
  path: string;
  runtime: string;
}

export interface ModelsListResult {
  models: ModelInfo[];
}

export interface ModelsLoadParams {
  keep_alive?: string | number | null;
  model: string;
  options?: LoadOptions;
  /** @default "auto" */
  runtime?: "auto" | "llama.cpp" | "onnxruntime" | "transformers";
}

export interface ModelsUnloadParams {
  model: string;
  /** @default "any" */
  runtime?: "any" | "llama.cpp" | "onnxruntime" | "transformers";
}

export interface ModelsUnloadResult {
  unloaded: ModelInfo[];
}

export interface Notification {
  /** @default "2.0" */
  jsonrpc?: "2.0";
  method: string;
  params?: { [key: string]: unknown } | null;
}

export interface PoolInfo {
  budget_bytes: number;
  loading: string[];
  used_bytes: number;
}

/** `$/progress`: `step` never goes backwards for one request; about 10 per second, the last always sent. */
export interface ProgressEvent {
  id: number | string;
  message?: string | null;
  metrics?: { [key: string]: number } | null;
  position?: number | null;
  stage: string;
  step?: number | null;
  total?: number | null;
}

/**
 * gguf: `type` is a quantization type name (case-insensitive); the source may be a GGUF file, an artifact
 * or an HF model. coreml: `quantization` compresses a .mlpackage (or a model, exported first).
 */
export interface QuantizeParams {
  format: "coreml" | "gguf";
  model: string;
  /** @default true */
  modelfile?: boolean;
  name?: string | null;
  options?: LoadOptions;
  output?: string | null;
  quantization?: CoreMLQuantization | null;
  type?: string | null;
}

export interface QuantizeResult {
  artifact: Artifact;
  /** @default [] */
  files?: ExportedFile[];
  format: string;
  path: string;
  quantization_report?: { [key: string]: unknown } | null;
  ratio: number;
  seconds: number;
  size_bytes: number;
  source_size_bytes: number;
  type: string;
  /** @default [] */
  warnings?: string[];
}

export interface Request {
  id: number | string;
  /** @default "2.0" */
  jsonrpc?: "2.0";
  method: string;
  params?: { [key: string]: unknown } | null;
}

export interface Response {
  error?: ErrorObject | null;
  id: number | string | null;
  /** @default "2.0" */
  jsonrpc?: "2.0";
  result?: unknown;
}

export interface ServerCapabilities {
  devices: string[];
  maxConcurrentJobs: number;
  maxMessageBytes: number;
  maxQueuedJobs: number;
  methods: { [key: string]: MethodInfo };
}

export interface ServerInfo {
  coremltools: string | null;
  llama_cpp: string | null;
  name: string;
  pid: number;
  python: string;
  torch: string | null;
  version: string;
}

export interface ShutdownResult {
  cancelled: (number | string)[];
}

export interface StatusResult {
  jobs: JobInfo[];
  max_concurrent_jobs: number;
  max_queued_jobs: number;
  models: ModelInfo[];
  pool: PoolInfo;
  threads?: ThreadInfo | null;
  uptime_s: number;
}

/**
 * The thread policy in force for every job (sidecar and workers), and why it was chosen.
 * With `adaptive`, a job computes on `threads` at most and on fewer while other programs keep cores
 * busy: `threads_now` is what a job starting now would get, from the last reading of the CPUs
 * (`others_busy_cores`, null before the first). A request's `options.n_threads` is used as given.
 */
export interface ThreadInfo {
  /** @default false */
  adaptive?: boolean;
  others_busy_cores?: number | null;
  reason: string;
  threads: number;
  threads_now?: number | null;
  wait_policy: string;
}

export interface Timings {
  eval_ms: number;
  load_ms: number;
  prompt_eval_ms: number;
  tokens_per_s: number;
  ttft_ms: number;
}

/** `$/token`: `seq` counts from 0 without gaps; `text` holds whole code points only. */
export interface TokenEvent {
  id: number | string;
  seq: number;
  text: string;
}

export interface TokenStats {
  max: number;
  mean: number;
  median: number;
  min: number;
  p95: number;
  total: number;
  trained_tokens: number;
}

export interface TrainFiles {
  loss_curve_png: string | null;
  metrics_csv: string;
  metrics_json: string;
  run_dir: string;
}

export interface TrainMetrics {
  best_val_loss: number | null;
  epochs: number;
  examples: number;
  peak_gpu_bytes: number | null;
  peak_rss_bytes: number;
  steps: number;
  tokens: number;
  tokens_per_s: number;
  train_loss: number | null;
  train_s: number;
  trained_tokens: number;
  val_loss: number | null;
}

/** Fields left out come from the preset (or the checkpoint being resumed), then the defaults. */
export interface TrainParams {
  batch_size?: number;
  batch_tokens?: number | null;
  chat_template?: string | null;
  checkpoint_every?: number | null;
  data?: string | DatasetRef;
  distributed?: DistributedOptions;
  early_stopping_patience?: number | null;
  epochs?: number;
  eval_every?: number | null;
  gradient_accumulation?: number;
  gradient_checkpointing?: boolean;
  learning_rate?: number;
  lora_alpha?: number;
  lora_dropout?: number;
  lora_rank?: number;
  loss_on?: "all" | "auto" | "completions";
  lr_schedule?: "constant" | "cosine" | "linear";
  max_grad_norm?: number | null;
  max_seq_length?: number;
  max_steps?: number | null;
  method?: "dora" | "full" | "lora" | "qlora";
  model?: string;
  name?: string | null;
  options?: LoadOptions;
  output?: string | null;
  packing?: boolean;
  preset?: "quality" | "quick" | null;
  resume_from?: string | null;
  seed?: number;
  strict?: boolean;
  target_modules?: string[] | "all-linear";
  validation?: string | DatasetRef | null;
  validation_split?: number;
  warmup_ratio?: number;
  warmup_steps?: number | null;
  weight_decay?: number;
}

export interface TrainResult {
  artifact: Artifact;
  checkpoints: string[];
  files: TrainFiles;
  metrics: TrainMetrics;
  params: { [key: string]: unknown };
  run_id: string | null;
  stopped: "completed" | "early_stopping" | "max_steps";
}

export interface Usage {
  completion_tokens: number;
  prompt_tokens: number;
}

/** Every method: its params and its result. */
export interface Methods {
  /** One artifact of the registry by id. */
  "artifacts/get": { params: ArtifactsGetParams; result: Artifact };
  /** Artifacts in the registry, newest first. */
  "artifacts/list": { params: ArtifactsListParams; result: ArtifactsListResult };
  /**
   * Measure models side by side: llama-bench speed (pp/tg), latency, memory, perplexity, golden-transcript parity and embeddings, with history and significance.
   * Runs in a worker process, through the job queue.
   */
  "benchmark": { params: BenchmarkParams; result: BenchmarkResult };
  /**
   * Detect a dataset's format, count its rows and tokens, show rendered samples and list its problems.
   * Runs in a worker process, through the job queue.
   */
  "datasets/inspect": { params: DatasetsInspectParams; result: DatasetsInspectResult };
  /**
   * Diagnostic: kills its own worker process.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  "debug/crash": { params: DebugCrashParams; result: EmptyResult };
  /**
   * Diagnostic: writes to fd 1 from the sidecar and from a child process.
   * Only when the sidecar runs with --debug.
   */
  "debug/print": { params: Empty; result: DebugPrintResult };
  /**
   * Diagnostic long job: sleeps in a worker with progress.
   * Runs in a worker process, through the job queue.
   * Only when the sidecar runs with --debug.
   */
  "debug/sleep": { params: DebugSleepParams; result: DebugSleepResult };
  /**
   * Diagnostic: streams tokens from the sidecar process.
   * Only when the sidecar runs with --debug.
   */
  "debug/stream": { params: DebugStreamParams; result: DebugStreamResult };
  /** Embed one text or many, with the model's pooling. */
  "embed": { params: EmbedParams; result: EmbedResult };
  /**
   * Export a model (optionally with adapters, merged or beside it) to GGUF (with a Modelfile), Core ML or ONNX, with a model card.
   * Runs in a worker process, through the job queue.
   */
  "export": { params: ExportParams; result: ExportResult };
  /** Generate text from a prompt or chat messages, streaming $/token events. */
  "generate": { params: GenerateParams; result: GenerateResult };
  /** Negotiate the protocol version and learn the sidecar's capabilities. */
  "initialize": { params: InitializeParams; result: InitializeResult };
  /**
   * Fold PEFT LoRA/DoRA adapters (each with a weight) into the base model and verify the merge.
   * Runs in a worker process, through the job queue.
   */
  "merge_lora": { params: MergeLoraParams; result: MergeLoraResult };
  /** Models loaded in the pool. */
  "models/list": { params: Empty; result: ModelsListResult };
  /** Load (warm) a model into the pool, with progress. */
  "models/load": { params: ModelsLoadParams; result: ModelInfo };
  /** Unload a model from the pool (waits until no request uses it). */
  "models/unload": { params: ModelsUnloadParams; result: ModelsUnloadResult };
  /** Liveness check, answered promptly even while jobs compute. */
  "ping": { params: Empty; result: EmptyResult };
  /**
   * Quantize a model: a GGUF type through llama.cpp, or Core ML palettization / linear quantization.
   * Runs in a worker process, through the job queue.
   */
  "quantize": { params: QuantizeParams; result: QuantizeResult };
  /** Stop accepting work and cancel running jobs; the process exits when stdin closes. */
  "shutdown": { params: Empty; result: ShutdownResult };
  /** Running and queued jobs, loaded models with their memory, the pool's budget. */
  "status": { params: Empty; result: StatusResult };
  /**
   * Fine-tune a model (LoRA, DoRA, QLoRA or full) on a dataset, with progress, checkpoints and resume.
   * Runs in a worker process, through the job queue.
   */
  "train": { params: TrainParams; result: TrainResult };
}

export type MethodName = keyof Methods;

export type MethodParams<M extends MethodName> = Methods[M]["params"];

export type MethodResult<M extends MethodName> = Methods[M]["result"];

/** The events the sidecar sends about a request, by method. */
export interface EventMap {
  "$/log": LogEvent;
  "$/progress": ProgressEvent;
  "$/token": TokenEvent;
}

export type EventMethod = keyof EventMap;

/** An event exactly as it arrives: switch on `method`. */
export type SidecarEvent =
  | { jsonrpc: "2.0"; method: "$/log"; params: LogEvent }
  | { jsonrpc: "2.0"; method: "$/progress"; params: ProgressEvent }
  | { jsonrpc: "2.0"; method: "$/token"; params: TokenEvent };

export type ErrorCodeName = "BUSY" | "CANCELLED" | "INTERNAL_ERROR" | "INVALID_PARAMS" | "INVALID_REQUEST" | "METHOD_NOT_FOUND" | "NOT_INITIALIZED" | "PARSE_ERROR" | "REQUEST_FAILED";

export type ErrorCodeValue = -32001 | -32800 | -32603 | -32602 | -32600 | -32601 | -32002 | -32700 | -32803;

/** `error.data.kind` of a -32803 (request failed) error. */
export type ErrorKind = "adapter_invalid" | "adapter_mismatch" | "artifact_exists" | "artifact_not_found" | "checkpoint_invalid" | "dataset_invalid" | "disk_full" | "file_not_found" | "input_empty" | "input_too_long" | "internal" | "model_not_found" | "no_chat_template" | "out_of_memory" | "path_not_allowed" | "prompt_too_long" | "registry_unavailable" | "result_too_large" | "shutting_down" | "timeout" | "unsupported_device" | "unsupported_model" | "verification_failed" | "worker_crashed";
