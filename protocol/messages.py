"""msgspec Structs for every message on the wire: envelopes, events and each method's params and result.

These types are the single source of truth: the dispatcher validates with them, the JSON Schema is
generated from them, and the docs and client types follow the schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

RequestId = Union[int, str]

# Params that name files. The schema marks each with "x-path" (what the sidecar does with it), and
# every one is checked against the allowed roots before any filesystem access: tests/test_path_fields.py
# finds them all through this mark, so a new field of these types is tested without being listed.
ModelRef = Annotated[str, msgspec.Meta(extra_json_schema={"x-path": "model"})]  # builtin:, artifact id, path or HF id
InputPath = Annotated[str, msgspec.Meta(extra_json_schema={"x-path": "input"})]
OutputPath = Annotated[str, msgspec.Meta(extra_json_schema={"x-path": "output"})]
ArtifactName = Annotated[str, msgspec.Meta(extra_json_schema={"x-path": "name"})]  # one plain path component


class Params(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every params struct: unknown fields are an error, never silently ignored."""


class Result(msgspec.Struct):
    """Base of every result struct."""


class Event(msgspec.Struct, omit_defaults=True):
    """Base of every event payload; absent optional fields are left out of the line."""


# ----- envelopes (documented in the schema; the dispatcher parses these by hand for precise errors)


class Request(msgspec.Struct):
    method: str
    id: RequestId
    params: dict[str, Any] | None = None
    jsonrpc: Literal["2.0"] = "2.0"


class Notification(msgspec.Struct):
    method: str
    params: dict[str, Any] | None = None
    jsonrpc: Literal["2.0"] = "2.0"


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: dict[str, Any] | None = None


class Response(msgspec.Struct, omit_defaults=True):
    id: RequestId | None
    result: Any = None
    error: ErrorObject | None = None
    jsonrpc: Literal["2.0"] = "2.0"


# ----- events (sidecar -> host notifications tied to a request id)


class ProgressEvent(Event):
    """`$/progress`: `step` never goes backwards for one request; about 10 per second, the last always sent."""

    id: RequestId
    stage: str
    step: int | None = None
    total: int | None = None
    message: str | None = None
    metrics: dict[str, float] | None = None
    position: int | None = None


class TokenEvent(Event):
    """`$/token`: `seq` counts from 0 without gaps; `text` holds whole code points only."""

    id: RequestId
    seq: int
    text: str


LogLevel = Literal["debug", "info", "warning", "error"]


class LogEvent(Event):
    """`$/log`: something the host should show its user (a fallback taken, a row skipped)."""

    id: RequestId
    level: LogLevel
    message: str
    data: dict[str, Any] | None = None


class CancelParams(Params):
    """`$/cancel` (host -> sidecar): unknown or finished ids are ignored."""

    id: RequestId


# ----- lifecycle


class ClientInfo(Params):
    name: str
    version: str | None = None


class ClientCapabilities(Params):
    allowNetwork: bool = False


class InitializeParams(Params):
    protocolVersion: str
    clientInfo: ClientInfo | None = None
    processId: int | None = None
    capabilities: ClientCapabilities | None = None


class ServerInfo(Result):
    name: str
    version: str
    pid: int
    python: str
    torch: str | None
    llama_cpp: str | None
    coremltools: str | None


class MethodInfo(Result):
    runs_in: Literal["sidecar", "worker"]
    cancellable: bool


class ServerCapabilities(Result):
    methods: dict[str, MethodInfo]
    devices: list[str]
    maxMessageBytes: int
    maxConcurrentJobs: int
    maxQueuedJobs: int


class InitializeResult(Result):
    protocolVersion: str
    serverInfo: ServerInfo
    capabilities: ServerCapabilities


class Empty(Params):
    pass


class EmptyResult(Result):
    pass


class JobInfo(Result):
    id: RequestId
    method: str
    state: Literal["running", "queued"]
    started: float | None
    position: int | None
    stage: str | None
    step: int | None
    total: int | None
    pid: int | None


class ModelInfo(Result):
    model: str
    path: str
    runtime: str
    device: str
    dtype: str
    memory_bytes: int
    in_use: int
    loaded_at: float
    keep_alive_s: float | None
    expires_at: float | None
    adapters: list[str] = []


class PoolInfo(Result):
    budget_bytes: int
    used_bytes: int
    loading: list[str]


class ThreadInfo(Result):
    """The thread policy in force for every job (sidecar and workers), and why it was chosen.

    With `adaptive`, a job computes on `threads` at most and on fewer while other programs keep cores
    busy: `threads_now` is what a job starting now would get, from the last reading of the CPUs
    (`others_busy_cores`, null before the first). A request's `options.n_threads` is used as given."""

    threads: int
    wait_policy: str
    reason: str
    adaptive: bool = False
    threads_now: int | None = None
    others_busy_cores: float | None = None


class StatusResult(Result):
    uptime_s: float
    jobs: list[JobInfo]
    models: list[ModelInfo]
    pool: PoolInfo
    max_concurrent_jobs: int
    max_queued_jobs: int
    threads: ThreadInfo | None = None


class ShutdownResult(Result):
    cancelled: list[RequestId]


# ----- model pool

KeepAlive = Union[str, int, float]


class LoadOptions(Params):
    """Options that change what is loaded; two loads with different options are different pool entries."""

    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    lora_path: InputPath | None = None
    lora_scale: float = 1.0


class ModelsLoadParams(Params):
    model: ModelRef
    runtime: Literal["auto", "transformers", "llama.cpp", "onnxruntime"] = "auto"
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)
    keep_alive: KeepAlive | None = None


class ModelsListResult(Result):
    models: list[ModelInfo]


class ModelsUnloadParams(Params):
    model: ModelRef
    runtime: Literal["any", "transformers", "llama.cpp", "onnxruntime"] = "any"


class ModelsUnloadResult(Result):
    unloaded: list[ModelInfo]


# ----- generate and embed


class ChatMessage(Params):
    role: str
    content: str


class AdapterRef(Params):
    """An unmerged PEFT LoRA adapter (a directory or a registry artifact id) applied with a weight."""

    adapter: ModelRef
    weight: float = 1.0


class GenerateParams(Params):
    model: ModelRef
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False
    stream: bool = True
    stream_interval_ms: float = 0.0
    truncate: bool = False
    adapters: list[AdapterRef] = []
    runtime: Literal["auto", "transformers", "llama.cpp", "onnxruntime"] = "auto"
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)
    keep_alive: KeepAlive | None = None


class Usage(Result):
    prompt_tokens: int
    completion_tokens: int


class Timings(Result):
    load_ms: float
    prompt_eval_ms: float
    eval_ms: float
    ttft_ms: float
    tokens_per_s: float


class GenerateResult(Result):
    model: str
    runtime: str
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timings: Timings
    seed: int | None


class EmbedParams(Params):
    model: ModelRef
    input: Union[str, list[str]]
    normalize: bool = True
    pooling: Literal["mean", "cls", "last"] | None = None
    truncate: bool = True
    encoding: Literal["float", "base64"] = "float"
    batch_size: int = 32
    runtime: Literal["auto", "transformers", "llama.cpp", "onnxruntime"] = "auto"
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)
    keep_alive: KeepAlive | None = None


class EmbedUsage(Result):
    prompt_tokens: int


class EmbedResult(Result):
    """`embeddings` holds float lists or base64 strings (little-endian float32), one per input,
    unless the result would exceed maxMessageBytes: then it is null and `path` names a .npy file."""

    model: str
    runtime: str
    dimensions: int
    count: int
    pooling: str
    normalized: bool
    encoding: str
    embeddings: list[Union[list[float], str]] | None
    path: str | None
    usage: EmbedUsage
    timings: dict[str, float]


# ----- artifact registry


class Artifact(Result):
    id: str
    kind: str
    name: str | None
    path: str
    parents: list[str]
    params: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]
    run_id: str | None
    created: float
    size_bytes: int


class ArtifactsListParams(Params):
    kind: str | None = None
    parent: str | None = None
    limit: int = 100


class ArtifactsListResult(Result):
    artifacts: list[Artifact]


class ArtifactsGetParams(Params):
    id: str


# ----- datasets and training

DatasetFormat = Literal["auto", "text", "completions", "chat", "alpaca", "sharegpt"]
FileType = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"]


class DatasetRef(Params):
    """A dataset file and how to read it; `columns` maps our field names to the file's own
    (for example {"prompt": "question", "completion": "answer"} or {"messages": "dialog"})."""

    path: InputPath
    format: DatasetFormat = "auto"
    file_type: FileType = "auto"
    columns: dict[str, str] = {}


DatasetArg = Union[InputPath, DatasetRef]


class DatasetsInspectParams(Params):
    data: DatasetArg
    model: ModelRef | None = None
    chat_template: str | None = None
    max_seq_length: int = 2048
    samples: int = 3
    strict: bool = False


class DatasetProblem(Result):
    row: int
    reason: str


class TokenStats(Result):
    min: int
    max: int
    mean: float
    median: float
    p95: int
    total: int
    trained_tokens: int


class DatasetSample(Result):
    row: int
    rendered: str
    tokens: int | None
    trained_tokens: int | None


class DatasetsInspectResult(Result):
    path: str
    file_type: str
    format: str
    rows: int
    valid_rows: int
    problem_count: int
    problems: list[DatasetProblem]
    samples: list[DatasetSample]
    tokens: TokenStats | None
    sha256: str


class DistributedOptions(Params):
    """Data-parallel training in `processes` local processes (PyTorch DDP; gloo on CPU, NCCL on GPUs)."""

    processes: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"


UNSET = msgspec.UNSET
Unset = msgspec.UnsetType


class TrainParams(Params):
    """Fields left out come from the preset (or the checkpoint being resumed), then the defaults."""

    model: ModelRef | Unset = UNSET
    data: DatasetArg | Unset = UNSET
    validation: DatasetArg | None | Unset = UNSET
    validation_split: float | Unset = UNSET
    preset: Literal["quick", "quality"] | None | Unset = UNSET
    method: Literal["lora", "dora", "qlora", "full"] | Unset = UNSET
    lora_rank: int | Unset = UNSET
    lora_alpha: float | Unset = UNSET
    lora_dropout: float | Unset = UNSET
    target_modules: list[str] | Literal["all-linear"] | Unset = UNSET
    loss_on: Literal["auto", "completions", "all"] | Unset = UNSET
    chat_template: str | None | Unset = UNSET
    max_seq_length: int | Unset = UNSET
    batch_size: int | Unset = UNSET
    batch_tokens: int | None | Unset = UNSET
    packing: bool | Unset = UNSET
    gradient_accumulation: int | Unset = UNSET
    learning_rate: float | Unset = UNSET
    lr_schedule: Literal["cosine", "linear", "constant"] | Unset = UNSET
    warmup_steps: int | None | Unset = UNSET
    warmup_ratio: float | Unset = UNSET
    weight_decay: float | Unset = UNSET
    max_grad_norm: float | None | Unset = UNSET
    epochs: float | Unset = UNSET
    max_steps: int | None | Unset = UNSET
    gradient_checkpointing: bool | Unset = UNSET
    seed: int | Unset = UNSET
    eval_every: int | None | Unset = UNSET
    early_stopping_patience: int | None | Unset = UNSET
    checkpoint_every: int | None | Unset = UNSET
    strict: bool | Unset = UNSET
    resume_from: InputPath | None | Unset = UNSET
    output: OutputPath | None | Unset = UNSET
    name: ArtifactName | None | Unset = UNSET
    distributed: DistributedOptions | Unset = UNSET
    options: LoadOptions | Unset = UNSET


class TrainMetrics(Result):
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    steps: int
    epochs: float
    examples: int
    tokens: int
    trained_tokens: int
    tokens_per_s: float
    train_s: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None


class TrainFiles(Result):
    run_dir: str
    metrics_csv: str
    metrics_json: str
    loss_curve_png: str | None


class TrainResult(Result):
    artifact: Artifact
    run_id: str | None
    stopped: Literal["completed", "max_steps", "early_stopping"]
    metrics: TrainMetrics
    files: TrainFiles
    checkpoints: list[str]
    params: dict[str, Any]


# ----- merge, export, quantize

ModelDtype = Literal["auto", "f32", "f16", "bf16"]


class MergeLoraParams(Params):
    """Fold one or more PEFT LoRA/DoRA adapters, each with its weight, into the base model's weights."""

    model: ModelRef
    adapters: list[AdapterRef]
    output: OutputPath | None = None
    name: ArtifactName | None = None
    dtype: ModelDtype = "auto"
    verify: bool = True
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)


class MergeVerification(Result):
    """The merged model against the base with the adapters attached unmerged, on a few probe prompts."""

    probes: int
    max_abs_logit_diff: float
    dtype: str


class MergeLoraResult(Result):
    artifact: Artifact
    verification: MergeVerification | None
    tensors: int
    merged_tensors: int
    seconds: float


class CoreMLQuantizationOverride(Params):
    """Mixed precision: settings for the ops of one type or one name (`skip` leaves them uncompressed)."""

    op_type: str | None = None
    op_name: str | None = None
    mode: Literal["palettize", "linear"] | None = None
    nbits: int | None = None
    granularity: Literal["per_tensor", "per_channel", "per_grouped_channel", "per_block"] | None = None
    group_size: int | None = None
    dtype: Literal["int4", "int8"] | None = None
    block_size: int | None = None
    skip: bool = False


class CoreMLQuantization(Params):
    """Core ML weight compression: k-means palettization (`nbits`) or linear quantization (`dtype`)."""

    mode: Literal["palettize", "linear"]
    nbits: int | None = None
    granularity: Literal["per_tensor", "per_channel", "per_grouped_channel", "per_block"] | None = None
    group_size: int | None = None
    dtype: Literal["int4", "int8"] | None = None
    block_size: int | None = None
    overrides: list[CoreMLQuantizationOverride] = []


class ExportParams(Params):
    """`output` is the directory the export makes (left out: a new one under the home, named by `name`).

    `quantization` is a GGUF type name for gguf, a CoreMLQuantization for coreml, "int8" (dynamic) for onnx;
    `context_length`, `prefill_length` and `functions` apply to coreml only."""

    model: ModelRef
    format: Literal["gguf", "coreml", "onnx"]
    outtype: Literal["auto", "f32", "f16", "bf16", "q8_0"] = "auto"
    quantization: str | CoreMLQuantization | None = None
    context_length: int | None = None
    prefill_length: int | None = None
    functions: list[Literal["prefill", "decode", "embed"]] | None = None
    adapters: list[AdapterRef] = []
    merge: bool = False
    modelfile: bool = True
    system: str | None = None
    output: OutputPath | None = None
    name: ArtifactName | None = None
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)


class ExportedFile(Result):
    role: Literal["model", "adapter", "modelfile", "model_card", "tokenizer", "other"]
    path: str
    size_bytes: int


class ExportResult(Result):
    artifact: Artifact
    format: str
    path: str
    outtype: str
    quantization: str | None
    files: list[ExportedFile]
    seconds: float
    warnings: list[str] = []
    spec: dict[str, Any] | None = None
    quantization_report: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None


class QuantizeParams(Params):
    """gguf: `type` is a quantization type name (case-insensitive); the source may be a GGUF file, an artifact
    or an HF model. coreml: `quantization` compresses a .mlpackage (or a model, exported first)."""

    model: ModelRef
    format: Literal["gguf", "coreml"]
    type: str | None = None
    quantization: CoreMLQuantization | None = None
    output: OutputPath | None = None
    name: ArtifactName | None = None
    modelfile: bool = True
    options: LoadOptions = msgspec.field(default_factory=LoadOptions)


class QuantizeResult(Result):
    artifact: Artifact
    format: str
    path: str
    type: str
    size_bytes: int
    source_size_bytes: int
    ratio: float
    seconds: float
    files: list[ExportedFile] = []
    warnings: list[str] = []
    quantization_report: dict[str, Any] | None = None


# ----- benchmark


class BenchmarkModel(Params):
    """One model of a benchmark; `label` names its row (default: the reference). Adapters are unmerged PEFT
    adapters on transformers; `device` and `dtype` as for models/load."""

    model: ModelRef
    runtime: Literal["auto", "transformers", "llama.cpp", "onnxruntime"] = "auto"
    adapters: list[AdapterRef] = []
    label: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class BenchmarkPerplexity(Params):
    """Perplexity on a UTF-8 text file. `sliding`: windows of `context` tokens every `stride` tokens, each
    scoring only the tokens the previous window did not reach; `chunks`: llama-perplexity's non-overlapping
    chunks of `context` tokens, the second half of each scored. `max_tokens` keeps only the text's first tokens."""

    data: InputPath
    method: Literal["sliding", "chunks"] = "sliding"
    context: int = 512
    stride: int = 256
    max_tokens: int | None = None


class BenchmarkGolden(Params):
    """Golden transcripts: `reference` (a label of `models` or a model reference) decodes each prompt greedily
    for `tokens` tokens; every model is compared free-running and teacher-forced along those tokens."""

    reference: ModelRef
    prompts: list[str]
    tokens: int = 64


class BenchmarkEmbed(Params):
    """Texts to embed (a list, or a UTF-8 file with one text per line); compared with the golden reference's
    embeddings, or the first model's."""

    texts: Union[InputPath, list[str]]
    batch_size: int = 32


class BenchmarkParams(Params):
    """Speed as llama-bench measures it (pp: one batch of N random prompt tokens; tg: N random tokens decoded one
    at a time from an empty context), for every model in its own process, with the same threads, OpenMP wait
    policy and batch sizes; plus perplexity, golden-transcript parity and embeddings when asked."""

    models: list[BenchmarkModel]
    threads: int | None = None
    omp_wait_policy: Literal["inherit", "passive", "active"] = "inherit"
    batch_size: int = 2048
    ubatch_size: int = 512
    prompt_tokens: list[int] = msgspec.field(default_factory=lambda: [512])
    gen_tokens: list[int] = msgspec.field(default_factory=lambda: [128])
    repetitions: int = 5
    warmup: int = 1
    seed: int = 1234
    perplexity: BenchmarkPerplexity | None = None
    golden: BenchmarkGolden | None = None
    embed: BenchmarkEmbed | None = None
    output: OutputPath | None = None
    name: ArtifactName | None = None


class BenchmarkSettings(Result):
    """What every row was measured with (identical for all models of a run)."""

    threads: int
    omp_wait_policy: str
    batch_size: int
    ubatch_size: int
    prompt_tokens: list[int]
    gen_tokens: list[int]
    repetitions: int
    warmup: int
    seed: int


class BenchmarkSpeed(Result):
    """One llama-bench test: `pp512` or `tg128`; tokens/s per repetition, their mean and sample std."""

    test: str
    kind: Literal["pp", "tg"]
    tokens: int
    mean_tps: float
    std_tps: float
    samples_tps: list[float]


class BenchmarkLatency(Result):
    """Time to first token (a prompt of the first pp length, then the first token chosen), and the
    per-token decode latency percentiles over every tg step of every repetition."""

    ttft_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


class BenchmarkPerplexityResult(Result):
    method: str
    context: int
    stride: int | None
    tokens: int
    scored: int
    nll: float
    ppl: float


class BenchmarkParityPrompt(Result):
    """`first_divergence`: the index of the first generated token that differs from the reference's (null:
    none in `tokens`); `top1_agreement`: the fraction of positions whose top-1 is the reference's token, fed
    the reference's tokens."""

    prompt: int
    tokens: int
    first_divergence: int | None
    top1_agreement: float
    same_prompt_tokens: bool


class BenchmarkParity(Result):
    reference: str
    prompts: list[BenchmarkParityPrompt]
    identical: int
    mean_top1_agreement: float


class BenchmarkEmbedResult(Result):
    texts: int
    dimensions: int
    per_s: float
    reference: str
    cosine_mean: float | None
    cosine_min: float | None


class BenchmarkMachine(Result):
    """The machine while the row was measured: CPU time other processes used (in CPUs), the load average,
    and whether that was enough to slow the numbers (`busy`)."""

    cpus: int
    foreign_cpus: float | None
    load_avg_1m: float | None
    busy: bool
    note: str | None


class BenchmarkChangeTest(Result):
    test: str
    previous_mean_tps: float
    pct: float
    p_value: float | None
    significant: bool


class BenchmarkChange(Result):
    """Against the last run of the same model and settings: percent change of the first pp and tg test and
    whether any test changed significantly (Welch's t-test on the repetitions, two-sided p < 0.05)."""

    previous_run: str
    previous_created: float
    pp_pct: float | None
    tg_pct: float | None
    significant: bool
    tests: list[BenchmarkChangeTest]
    note: str | None = None


class BenchmarkError(Result):
    kind: str
    message: str
    code: int


class BenchmarkRow(Result):
    label: str
    model: str
    path: str | None
    runtime: str | None
    status: Literal["ok", "failed"]
    error: BenchmarkError | None
    adapters: list[str]
    device: str | None
    dtype: str | None
    size_bytes: int | None
    load_s: float | None
    peak_rss_bytes: int | None
    gpu_memory_bytes: int | None
    speed: list[BenchmarkSpeed]
    latency: BenchmarkLatency | None
    perplexity: BenchmarkPerplexityResult | None
    parity: BenchmarkParity | None
    embed: BenchmarkEmbedResult | None
    settings: BenchmarkSettings
    machine: BenchmarkMachine | None
    key: str
    change: BenchmarkChange | None


class BenchmarkFiles(Result):
    report_json: str
    report_md: str
    chart_png: str | None


class BenchmarkResult(Result):
    artifact: Artifact
    rows: list[BenchmarkRow]
    markdown: str
    settings: BenchmarkSettings
    files: BenchmarkFiles
    seconds: float


# ----- diagnostic methods (only with --debug): exercise the job engine before the real long methods exist


class DebugSleepParams(Params):
    """A long job in a worker process that sleeps in `steps` slices, reporting progress."""

    seconds: float = 1.0
    steps: int = 10
    write_stdout: bool = False
    fail: str | None = None


class DebugSleepResult(Result):
    steps: int
    slept_s: float
    pid: int


class DebugStreamParams(Params):
    """Streams `count` tokens from inside the sidecar, as generation will."""

    count: int = 100
    text: str = "tok "
    delay_ms: float = 0.0


class DebugStreamResult(Result):
    count: int
    text: str


class DebugCrashParams(Params):
    """Kills its own worker process in the chosen way, to prove the sidecar survives it."""

    mode: Literal["sigkill", "segfault", "exit", "raise", "memory_error"] = "sigkill"
    after_s: float = 0.0


class DebugPrintResult(Result):
    wrote: list[str]
