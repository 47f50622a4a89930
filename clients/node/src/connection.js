// The requests of one sidecar process: writes them, routes each incoming line to its call by id
// (events by params.id, responses by id), and fails whatever is pending when the process ends.

import { Call } from "./call.js";
import { SidecarError, clientError, exitedError } from "./errors.js";
import { ErrorCode } from "./methods.js";
import { SidecarProcess } from "./process.js";

const HEAD = '{"jsonrpc":"2.0","id":';
const tails = new Map(); // method name -> `,"method":"<name>"`: saves a JSON.stringify per request

function methodTail(method) {
  let text = tails.get(method);
  if (text === undefined) tails.set(method, (text = `,"method":${JSON.stringify(method)}`));
  return text;
}

// The answer of ping (and of any request whose result is {}), exactly as the sidecar writes it:
// `{"jsonrpc":"2.0","id":7,"result":{}}`. Recognised without JSON.parse; anything else is parsed.
const EMPTY_TAIL = ',"result":{}}';
const EMPTY_MAX = HEAD.length + 16 + EMPTY_TAIL.length;

/** The id of a line that is exactly an empty-result response, or -1. */
export function emptyResultId(line) {
  const end = line.length - EMPTY_TAIL.length;
  if (line.length > EMPTY_MAX || end <= HEAD.length || !line.startsWith(HEAD) || !line.endsWith(EMPTY_TAIL)) return -1;
  let id = 0;
  for (let at = HEAD.length; at < end; at++) {
    const digit = line.charCodeAt(at) - 48;
    if (digit < 0 || digit > 9) return -1;
    id = id * 10 + digit;
  }
  // a leading zero is not JSON; 16 digits may be past 2**53 (this client's ids never are)
  return (line.charCodeAt(HEAD.length) === 48 && end > HEAD.length + 1) || id > Number.MAX_SAFE_INTEGER ? -1 : id;
}

export class Connection {
  #pending = new Map();
  #onUnmatched;
  maxMessageBytes = Infinity; // from initialize

  /** @param {object} options SidecarProcess's options, plus onUnmatched(message) */
  constructor({ onUnmatched, ...processOptions }) {
    this.#onUnmatched = onUnmatched;
    this.proc = new SidecarProcess({ ...processOptions, onLine: (line) => this.#receive(line) });
    this.exited = this.proc.exited.then((info) => {
      for (const call of this.#pending.values()) call._settle(exitedError(info, call.method, call.id));
      return info;
    });
  }

  get open() {
    return !this.proc.done;
  }

  /** Writes a request; the returned call settles with its response. */
  send(id, method, params, options, buffer) {
    // built first: JSON.stringify may throw (a cycle, a BigInt), and then nothing has started
    const head = HEAD + id + methodTail(method);
    const line = params === undefined ? `${head}}\n` : `${head},"params":${JSON.stringify(params)}}\n`;
    const call = new Call(id, method, this, options, buffer);
    if (line.length * 3 > this.maxMessageBytes) {
      // a line over the limit would be answered with id null, never matched to this call
      const size = Buffer.byteLength(line) - 1;
      if (size > this.maxMessageBytes) {
        call._settle(new SidecarError(`${method} (id ${id}) is ${size} bytes, more than the sidecar's maxMessageBytes `
          + `(${this.maxMessageBytes}); send bulk data as a file path instead`,
        { code: ErrorCode.INVALID_REQUEST, data: { maxMessageBytes: this.maxMessageBytes, size }, method, id }));
        return call;
      }
    }
    this.#pending.set(id, call);
    try {
      this.proc.write(line);
    } catch (error) {
      // stdin is broken: the exit normally follows at once and rejects the call with its details
      this.proc.waitExit(1000).then(() => call._settle(clientError("not_running",
        `could not send ${method} (id ${id}) to the sidecar: ${error.message}`, { code: error.code }, { method, id, cause: error })));
    }
    return call;
  }

  notify(method, params) {
    this.proc.write(`${JSON.stringify({ jsonrpc: "2.0", method, params })}\n`);
  }

  /** Call's owner interface: `$/cancel` for it. */
  cancel(call) {
    try {
      this.proc.write(`{"jsonrpc":"2.0","method":"$/cancel","params":{"id":${call.id}}}\n`);
    } catch {
      // the process is going away; its exit settles the call
    }
  }

  /** Call's owner interface: it has its answer. */
  settled(call) {
    this.#pending.delete(call.id);
  }

  #receive(line) {
    const id = emptyResultId(line);
    if (id !== -1) {
      const call = this.#pending.get(id);
      if (call !== undefined) {
        call._settle(null, {});
        return;
      }
    }
    let message;
    try {
      message = JSON.parse(line);
    } catch {
      this.#onUnmatched?.(line);
      return;
    }
    const call = message?.method !== undefined ? this.#pending.get(message.params?.id) : this.#pending.get(message?.id);
    if (call === undefined) {
      this.#onUnmatched?.(message);
    } else if (message.method !== undefined) {
      call._event(message);
    } else if (message.error != null) {
      call._settle(SidecarError.fromWire(message.error, call.method, call.id));
    } else {
      call._settle(null, message.result);
    }
  }
}
