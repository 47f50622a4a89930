// One request in flight: an async iterator over its events and a `result` promise. Events are
// buffered for the iterator (unless the caller only wants `onEvent`), so none is lost between
// sending the request and starting the loop.

import { CancelledError, clientError } from "./errors.js";

const noop = () => {};
const DETACHED = { cancel: noop, settled: noop }; // the owner of a call that was never sent

export class Call {
  #owner;
  #buffer;
  #onEvent;
  #events = null;
  #head = 0;
  #waiter = null;
  #error = null;
  #done = false;
  #resolve;
  #reject;
  #signal = null;
  #abort = null;
  #timer = null;
  #cancelSent = false;

  /**
   * @param {number} id
   * @param {string} method
   * @param {{cancel(call: Call): void, settled(call: Call): void}} owner sends `$/cancel`, forgets the call
   * @param {{signal?: AbortSignal, timeoutMs?: number, onEvent?: Function}} options
   * @param {boolean} buffer keep events for the iterator
   */
  constructor(id, method, owner = DETACHED, options = undefined, buffer = true) {
    this.id = id;
    this.method = method;
    this.#owner = owner;
    this.#buffer = buffer;
    this.result = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    // whoever iterates may never look at `result`: its rejection must not count as unhandled
    if (buffer) this.result.catch(noop);
    if (options == null) return; // ping() and the like: no signal, timer or handler to set up
    const { signal, timeoutMs, onEvent } = options;
    this.#onEvent = onEvent;
    if (signal) {
      this.#signal = signal;
      this.#abort = () => this.cancel();
      signal.addEventListener("abort", this.#abort, { once: true });
    }
    if (timeoutMs > 0) this.#timer = setTimeout(() => this.#timeout(timeoutMs), timeoutMs);
  }

  /** True once the response (or a local failure) has arrived. */
  get settled() {
    return this.#done;
  }

  /** Sends `$/cancel`; the call then ends with a CancelledError carrying `partial`. */
  cancel() {
    if (this.#done || this.#cancelSent) return;
    this.#cancelSent = true;
    this.#owner.cancel(this);
  }

  /** @internal an event for this request */
  _event(message) {
    if (this.#done) return;
    if (this.#onEvent) {
      try {
        this.#onEvent(message);
      } catch (error) {
        // a throwing handler ends its own request, never the client
        this.cancel();
        this._settle(error);
        return;
      }
    }
    if (!this.#buffer) return;
    if (this.#waiter) {
      const waiter = this.#waiter;
      this.#waiter = null;
      waiter.resolve({ value: message, done: false });
    } else {
      (this.#events ??= []).push(message);
    }
  }

  /** @internal the end: an error, or null and the result */
  _settle(error, value) {
    if (this.#done) return;
    this.#done = true;
    this.#owner.settled(this);
    if (this.#timer) clearTimeout(this.#timer);
    if (this.#abort) this.#signal.removeEventListener("abort", this.#abort);
    if (error) {
      this.#error = error;
      this.#reject(error);
    } else {
      this.#resolve(value);
    }
    if (this.#waiter) {
      const waiter = this.#waiter;
      this.#waiter = null;
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }

  #timeout(ms) {
    this.cancel();
    this._settle(clientError("timeout", `${this.method} (id ${this.id}) got no answer within ${ms} ms; it was cancelled`,
      { timeoutMs: ms }, { retryable: true, method: this.method, id: this.id }));
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    const events = this.#events;
    if (events !== null && this.#head < events.length) {
      const value = events[this.#head];
      events[this.#head++] = undefined;
      if (this.#head === events.length) {
        this.#events = null;
        this.#head = 0;
      }
      return Promise.resolve({ value, done: false });
    }
    if (this.#done) return this.#error ? Promise.reject(this.#error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  /** Leaving the loop early stops buffering; the request itself goes on (cancel it with a signal). */
  return() {
    this.#buffer = false;
    this.#events = null;
    this.#head = 0;
    return Promise.resolve({ value: undefined, done: true });
  }
}

/** A call that failed before it was sent. */
export function failedCall(id, method, error) {
  const call = new Call(id, method);
  call._settle(error);
  return call;
}

export function cancelledBeforeSending(id, method) {
  return failedCall(id, method, new CancelledError(`${method} was cancelled before it was sent`, { data: { partial: {} }, method, id }));
}
