// Declarations of the hand-written modules; the protocol types and method conveniences are
// generated (protocol.d.ts, methods.d.ts).

import type { ErrorKind, InitializeResult, MethodName, MethodParams, MethodResult, ServerCapabilities, ServerInfo, SidecarEvent } from "./protocol.js";
import { SidecarMethods } from "./methods.js";

export * from "./protocol.js";
export { ERROR_KINDS, ErrorCode, METHODS, MethodInfo, PROTOCOL_VERSION, SidecarMethods } from "./methods.js";

export interface ClientOptions {
  /** Default "python3". Spawned directly, never through a shell. */
  command?: string;
  /** Default ["-m", "sidecar"]; add "--debug", "--allow-root DIR", ... here. */
  args?: string[];
  /** Merged over process.env; a key set to undefined is removed. */
  env?: Record<string, string | undefined>;
  cwd?: string;
  clientInfo?: { name: string; version?: string };
  /** The version asked for in initialize; default PROTOCOL_VERSION. */
  protocolVersion?: string;
  /** Default timeout of every request; 0 (the default) means none. */
  requestTimeoutMs?: number;
  /** How long initialize may take; default 60000. */
  startTimeoutMs?: number;
  /** How many characters of stderr to keep for error messages; default 65536. */
  stderrTailChars?: number;
  /** Every piece of the sidecar's stderr (its logs), as it arrives. */
  onStderr?: (text: string) => void;
  /** The process ended, expectedly or not. */
  onExit?: (info: ExitInfo) => void;
  /** A message that belongs to no pending request (or a line that is not JSON). */
  onUnmatched?: (message: unknown) => void;
}

export interface ExitInfo {
  /** The exit code, or null when a signal ended the process (or it never started). */
  code: number | null;
  signal: string | null;
  stderrTail: string;
  /** Why the process could not be spawned. */
  error?: Error;
  /** The write to stdin that failed (EPIPE), if one did. */
  writeError?: Error;
}

export interface CallOptions {
  /** Aborting sends `$/cancel`; the call then rejects with a CancelledError. */
  signal?: AbortSignal;
  /** Cancel and reject with kind "timeout" after this long; overrides requestTimeoutMs. */
  timeoutMs?: number;
  /** Every event of this request, as it arrives (before the iterator sees it). */
  onEvent?: (event: SidecarEvent) => void;
}

export interface StopOptions {
  /** How long the shutdown request may take (it cancels running jobs); default 15000. */
  shutdownTimeoutMs?: number;
  /** After stdin is closed, how long to wait before SIGTERM; default 5000. */
  exitTimeoutMs?: number;
  /** After SIGTERM, how long to wait before SIGKILL; default 5000. */
  killTimeoutMs?: number;
}

/** One request in flight: iterate its events, await its result. */
export declare class Call<R = unknown> implements AsyncIterableIterator<SidecarEvent> {
  readonly id: number;
  readonly method: string;
  /** Resolves with the result; rejects with a SidecarError (CancelledError when cancelled). */
  readonly result: Promise<R>;
  readonly settled: boolean;
  /** Sends `$/cancel` (once). */
  cancel(): void;
  next(): Promise<IteratorResult<SidecarEvent, undefined>>;
  return(): Promise<IteratorResult<SidecarEvent, undefined>>;
  [Symbol.asyncIterator](): this;
}

export declare class SidecarClient extends SidecarMethods {
  constructor(options?: ClientOptions);
  /** A new client, started. */
  static start(options?: ClientOptions): Promise<SidecarClient>;
  readonly running: boolean;
  readonly pid: number | undefined;
  readonly serverInfo: ServerInfo | undefined;
  readonly capabilities: ServerCapabilities | undefined;
  readonly stderrTail: string;
  /** Resolves when the current process ends (null before the first start). */
  readonly exited: Promise<ExitInfo | null>;
  /** Spawns the sidecar and runs initialize; call again after the process ended to restart it. */
  start(): Promise<InitializeResult>;
  /** Sends a request; iterate the Call for its events (buffered until read), await `.result`. */
  request<M extends MethodName>(method: M, params?: MethodParams<M>, options?: CallOptions): Call<MethodResult<M>>;
  /** Sends a request and resolves with its result; events go to `options.onEvent` only. */
  call<M extends MethodName>(method: M, params?: MethodParams<M>, options?: CallOptions): Promise<MethodResult<M>>;
  /** Sends a notification (no answer), e.g. `$/cancel`. */
  notify(method: string, params?: unknown): void;
  /** shutdown, close stdin, wait; SIGTERM, wait; SIGKILL. */
  stop(options?: StopOptions): Promise<ExitInfo | null>;
}

/** Kinds the client itself reports. */
export type ClientErrorKind = "not_running" | "sidecar_exited" | "timeout" | "unsupported_version";
export declare const CLIENT_ERROR_KINDS: readonly ClientErrorKind[];

export declare class SidecarError extends Error {
  /** The JSON-RPC error code (client-made errors use -32803, or -32602/-32600 as the sidecar would). */
  readonly code: number;
  readonly data: any;
  /** `data.kind`: what went wrong, to branch on. */
  readonly kind: ErrorKind | ClientErrorKind | undefined;
  /** `data.retryable`: the same request may succeed later. */
  readonly retryable: boolean;
  readonly method: string | undefined;
  readonly id: number | undefined;
  constructor(message: string, options?: { code?: number; data?: unknown; method?: string; id?: number; cause?: unknown });
}

export declare class CancelledError extends SidecarError {
  /** What the request had done: the text so far, a checkpoint, ... */
  readonly partial: Record<string, any>;
}

/** Splits bytes into lines on 0x0A only (U+2028 is an ordinary character). */
export declare class LineSplitter {
  constructor(onLine: (line: string) => void);
  push(chunk: Uint8Array): void;
  end(): void;
}
