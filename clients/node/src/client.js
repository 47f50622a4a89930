// SidecarClient: starts the sidecar, matches responses and events to requests by id, and stops it
// cleanly. The per-method conveniences (generate, train, ...) come from the generated
// SidecarMethods base class.

import { cancelledBeforeSending, failedCall } from "./call.js";
import { Connection } from "./connection.js";
import { SidecarError, clientError } from "./errors.js";
import { ErrorCode, PROTOCOL_VERSION, SidecarMethods } from "./methods.js";

const noop = () => {};

const DEFAULTS = {
  command: "python3",
  args: ["-m", "sidecar"],
  env: undefined, // merged over process.env; a key set to undefined is removed
  cwd: undefined,
  clientInfo: { name: "mlsidecar-node", version: "0.1.0" },
  protocolVersion: PROTOCOL_VERSION,
  requestTimeoutMs: 0, // 0: no timeout (a train may run for hours)
  startTimeoutMs: 60_000,
  stderrTailChars: 64 * 1024,
  onStderr: undefined,
  onExit: undefined,
  onUnmatched: undefined,
};

export class SidecarClient extends SidecarMethods {
  #options;
  #connection = null;
  #nextId = 1;
  #info = null;
  #stopping = null;

  constructor(options = {}) {
    super();
    this.#options = { ...DEFAULTS, ...options };
  }

  /** A new client, started. */
  static async start(options) {
    const client = new SidecarClient(options);
    await client.start();
    return client;
  }

  get running() {
    return this.#connection?.open ?? false;
  }

  get pid() {
    return this.#connection?.proc.pid;
  }

  get serverInfo() {
    return this.#info?.serverInfo;
  }

  get capabilities() {
    return this.#info?.capabilities;
  }

  get stderrTail() {
    return this.#connection?.proc.stderrTail ?? "";
  }

  /** Resolves with {code, signal, stderrTail} when the current process ends. */
  get exited() {
    return this.#connection ? this.#connection.exited : Promise.resolve(null);
  }

  /** Spawns the sidecar and runs `initialize`; may be called again after the process ended. */
  async start() {
    if (this.running) throw new Error("the sidecar is already running; stop() it before starting it again");
    const options = this.#options;
    const connection = new Connection({
      command: options.command,
      args: options.args,
      env: options.env ? { ...process.env, ...options.env } : process.env,
      cwd: options.cwd,
      stderrTailChars: options.stderrTailChars,
      onStderr: options.onStderr,
      onUnmatched: options.onUnmatched,
    });
    this.#connection = connection;
    this.#info = null;
    this.#stopping = null;
    connection.exited.then((info) => options.onExit?.(info));

    const params = { protocolVersion: options.protocolVersion, clientInfo: options.clientInfo, processId: process.pid };
    try {
      this.#info = await this.call("initialize", params, { timeoutMs: options.startTimeoutMs });
      connection.maxMessageBytes = this.#info.capabilities?.maxMessageBytes ?? Infinity;
    } catch (error) {
      await terminate(connection.proc, 2000, 2000);
      throw versionError(error, options.protocolVersion);
    }
    return this.#info;
  }

  /**
   * Sends a request. The returned Call is an async iterator of the request's events and has a
   * `result` promise; `options.signal` cancels it, `options.timeoutMs` bounds it.
   */
  request(method, params, options) {
    return this.#send(method, params, options, true);
  }

  /** Sends a request and resolves with its result; events go to `options.onEvent` only. */
  call(method, params, options) {
    return this.#send(method, params, options, false).result;
  }

  #send(method, params, options, buffer) {
    const id = this.#nextId++;
    const connection = this.#connection;
    if (!connection?.open) {
      return failedCall(id, method, clientError("not_running", `cannot send ${method}: the sidecar is not running; call start() first`,
        {}, { method, id }));
    }
    if (options?.signal?.aborted) return cancelledBeforeSending(id, method);
    if (options?.timeoutMs === undefined && this.#options.requestTimeoutMs > 0) {
      options = { ...options, timeoutMs: this.#options.requestTimeoutMs };
    }
    return connection.send(id, method, params, options, buffer);
  }

  /** Sends a notification (no answer). */
  notify(method, params) {
    if (!this.running) throw clientError("not_running", `cannot send ${method}: the sidecar is not running`, {}, { method });
    this.#connection.notify(method, params);
  }

  /**
   * The clean stop: `shutdown` (cancels running jobs), close stdin, wait for the exit; then
   * SIGTERM, then SIGKILL, each after its timeout. Resolves with {code, signal, stderrTail}.
   */
  stop({ shutdownTimeoutMs = 15_000, exitTimeoutMs = 5_000, killTimeoutMs = 5_000 } = {}) {
    const connection = this.#connection;
    if (!connection) return Promise.resolve(null);
    this.#stopping ??= (async () => {
      if (connection.open) {
        await this.call("shutdown", undefined, { timeoutMs: shutdownTimeoutMs }).catch(noop);
        await terminate(connection.proc, exitTimeoutMs, killTimeoutMs);
      }
      return connection.exited;
    })();
    return this.#stopping;
  }

}

/** Close stdin, wait; SIGTERM, wait; SIGKILL. */
async function terminate(proc, exitTimeoutMs, killTimeoutMs) {
  proc.closeInput();
  if (await proc.waitExit(exitTimeoutMs)) return;
  proc.kill("SIGTERM");
  if (await proc.waitExit(killTimeoutMs)) return;
  proc.kill("SIGKILL");
  await proc.exited;
}

/** -32602 with `data.supported` from initialize: say plainly that the versions do not match. */
function versionError(error, requested) {
  if (error?.code !== ErrorCode.INVALID_PARAMS || !Array.isArray(error.data?.supported)) return error;
  const message = `this client speaks protocol ${requested}, the sidecar speaks ${error.data.supported.join(", ")}; `
    + `install a client and a sidecar of matching versions (the sidecar said: ${error.message})`;
  return new SidecarError(message, { code: error.code, data: { ...error.data, kind: "unsupported_version" },
    method: "initialize", id: error.id, cause: error });
}
