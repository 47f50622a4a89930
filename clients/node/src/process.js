// The child process and its three pipes: lines out of stdout, serialized writes into stdin that
// respect backpressure, stderr drained into a bounded tail, and one `exited` promise that never
// rejects (spawn failures included).

import { spawn } from "node:child_process";
import { LineSplitter } from "./lines.js";

const STDOUT_GRACE_MS = 2000; // after exit, how long to wait for the last output before giving up on it

export class SidecarProcess {
  #child;
  #queue = null; // lines waiting for 'drain', or null while stdin accepts writes
  #ending = false; // closeInput() was called: end stdin once the queue is written
  #writeError = null;
  #stderrTail = "";
  #tailChars;

  /**
   * @param {object} options command, args, env, cwd, stderrTailChars, onLine(line), onStderr(text)
   */
  constructor({ command, args, env, cwd, stderrTailChars = 64 * 1024, onLine, onStderr }) {
    this.#tailChars = stderrTailChars;
    this.done = false;
    const child = spawn(command, args, { env, cwd, stdio: ["pipe", "pipe", "pipe"], windowsHide: true });
    this.#child = child;
    this.pid = child.pid;

    const splitter = new LineSplitter(onLine);
    child.stdout.on("data", (chunk) => splitter.push(chunk));
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (text) => {
      this.#stderrTail += text;
      if (this.#stderrTail.length > 2 * this.#tailChars) this.#stderrTail = this.#stderrTail.slice(-this.#tailChars);
      onStderr?.(text);
    });
    // EPIPE and friends: remembered and reported by write(), never thrown from the stream
    child.stdin.on("error", (error) => {
      this.#writeError ??= error;
    });

    this.exited = new Promise((resolve) => {
      let status = null;
      let stdoutClosed = false;
      const finish = () => {
        if (this.done) return;
        this.done = true;
        splitter.end();
        resolve({ ...status, stderrTail: this.stderrTail, ...(this.#writeError && { writeError: this.#writeError }) });
      };
      child.stdout.on("close", () => {
        stdoutClosed = true;
        if (status) finish();
      });
      child.on("exit", (code, signal) => {
        status = { code, signal };
        if (stdoutClosed) finish();
        else setTimeout(finish, STDOUT_GRACE_MS).unref();
      });
      child.on("error", (error) => {
        if (child.pid !== undefined) return; // a failed kill(); the exit still comes
        status = { code: null, signal: null, error };
        if (stdoutClosed) finish();
      });
    });
  }

  get stderrTail() {
    return this.#stderrTail.length > this.#tailChars ? this.#stderrTail.slice(-this.#tailChars) : this.#stderrTail;
  }

  /** Queues one line; throws if stdin is already broken (the process is gone or closed it). */
  write(text) {
    if (this.#writeError) throw this.#writeError;
    if (this.done || this.#child.stdin.writableEnded) throw new Error("the sidecar's stdin is closed");
    if (this.#queue) {
      this.#queue.push(text);
    } else if (!this.#child.stdin.write(text)) {
      this.#queue = [];
      this.#child.stdin.once("drain", () => this.#flush());
    }
  }

  #flush() {
    const queue = this.#queue;
    this.#queue = null;
    for (let index = 0; index < queue.length; index++) {
      if (this.#writeError) return;
      if (!this.#child.stdin.write(queue[index])) {
        this.#queue = queue.slice(index + 1);
        this.#child.stdin.once("drain", () => this.#flush());
        return;
      }
    }
    if (this.#ending) this.#child.stdin.end();
  }

  /** Closes stdin once every queued line is written: the sidecar's signal to finish and exit. */
  closeInput() {
    this.#ending = true;
    if (this.done) return;
    if (!this.#queue && !this.#writeError && !this.#child.stdin.writableEnded) this.#child.stdin.end();
  }

  kill(signal) {
    if (!this.done) this.#child.kill(signal);
  }

  /** Resolves true when the process has exited within `ms`, false on timeout. */
  waitExit(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.exited.then(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }
}
