// One error class for everything a request can end with: the sidecar's own errors keep their wire
// code, message and data; errors the client makes (the process died, a timeout) use -32803 with a
// kind of their own, so callers branch on `kind` either way.

import { ErrorCode } from "./methods.js";

/** Kinds the client itself reports, next to the sidecar's ERROR_KINDS. */
export const CLIENT_ERROR_KINDS = Object.freeze(["not_running", "sidecar_exited", "timeout", "unsupported_version"]);

export class SidecarError extends Error {
  constructor(message, { code = ErrorCode.REQUEST_FAILED, data, method, id, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "SidecarError";
    this.code = code;
    this.data = data;
    this.kind = typeof data?.kind === "string" ? data.kind : undefined;
    this.retryable = data?.retryable === true;
    this.method = method;
    this.id = id;
  }

  /** The error of a response, as the sidecar sent it. */
  static fromWire(error, method, id) {
    const Type = error.code === ErrorCode.CANCELLED ? CancelledError : SidecarError;
    return new Type(String(error.message), { code: error.code, data: error.data ?? undefined, method, id });
  }
}

/** -32800: the request was cancelled; `partial` holds what it finished (text so far, a checkpoint). */
export class CancelledError extends SidecarError {
  constructor(message, options = {}) {
    super(message, { ...options, code: ErrorCode.CANCELLED });
    this.name = "CancelledError";
    this.partial = this.data?.partial ?? {};
  }
}

/** An error made by the client, shaped like the sidecar's -32803 ones. */
export function clientError(kind, message, detail = {}, { retryable = false, ...rest } = {}) {
  return new SidecarError(message, { ...rest, data: { kind, retryable, detail } });
}

/** What every request still pending gets when the process ends. */
export function exitedError(info, method, id) {
  const how = info.error ? `could not be started (${info.error.message})`
    : info.signal ? `was killed by ${info.signal}` : `exited with code ${info.code}`;
  const tail = info.stderrTail.trimEnd().slice(-2000);
  const broken = info.writeError ? ` (writing to its stdin failed: ${info.writeError.code ?? info.writeError.message})` : "";
  const message = `the sidecar ${how} before answering ${method} (id ${id})${broken}`
    + (tail ? `; the end of its stderr:\n${tail}` : "; it wrote nothing to stderr");
  return clientError("sidecar_exited", message, { exitCode: info.code, signal: info.signal, stderrTail: info.stderrTail },
    { retryable: true, method, id, cause: info.error ?? info.writeError });
}
