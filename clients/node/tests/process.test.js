// The process layer against stand-in sidecars (tests/fake-sidecar.mjs): spawn failures, EPIPE,
// backpressure, the SIGTERM/SIGKILL escalation. No Python needed.

import assert from "node:assert/strict";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { CancelledError, SidecarClient, SidecarError } from "../src/index.js";

const FAKE = fileURLToPath(new URL("./fake-sidecar.mjs", import.meta.url));
const fake = (mode, options = {}) => new SidecarClient({ command: process.execPath, args: [FAKE, mode], ...options });

test("a command that does not exist rejects start() with sidecar_exited and the spawn error", async () => {
  const client = new SidecarClient({ command: "mlsidecar-no-such-command" });
  await assert.rejects(client.start(), (error) => {
    assert.ok(error instanceof SidecarError);
    assert.equal(error.kind, "sidecar_exited");
    assert.equal(error.cause.code, "ENOENT");
    assert.match(error.message, /could not be started/);
    return true;
  });
  assert.equal(client.running, false);
});

test("a process that dies at once rejects start() with its exit code and stderr tail", async () => {
  const client = new SidecarClient({ command: process.execPath, args: ["-e", "process.stderr.write('boom: no module named sidecar\\n'); process.exit(3)"] });
  await assert.rejects(client.start(), (error) => {
    assert.equal(error.kind, "sidecar_exited");
    assert.equal(error.retryable, true);
    assert.equal(error.data.detail.exitCode, 3);
    assert.equal(error.data.detail.signal, null);
    assert.match(error.data.detail.stderrTail, /boom: no module named sidecar/);
    assert.match(error.message, /exited with code 3[\s\S]*boom/);
    return true;
  });
});

test("requests before start() fail with not_running", async () => {
  const client = new SidecarClient();
  await assert.rejects(client.ping(), (error) => error.kind === "not_running");
});

test("writes under backpressure arrive whole and in order", async () => {
  const client = fake("echo");
  await client.start();
  const payload = "x".repeat(100_000);
  const calls = Array.from({ length: 200 }, (_, n) => client.call("echo", { n, payload }));
  const results = await Promise.all(calls);
  assert.deepEqual(results.map((result) => result.echo.n), Array.from({ length: 200 }, (_, n) => n));
  assert.ok(results.every((result) => result.echo.payload === payload));
  const exit = await client.stop({ shutdownTimeoutMs: 2000 });
  assert.equal(exit.code, 0);
});

test("EPIPE from a process that closed its stdin is an error on the request, not an uncaught exception", async () => {
  const client = fake("hangup");
  await client.start();
  await new Promise((resolve) => setTimeout(resolve, 100)); // it has closed its stdin by now
  const big = "y".repeat(4 << 20);
  const results = await Promise.allSettled([client.call("echo", { big }), client.call("echo", { big })]);
  for (const result of results) {
    assert.equal(result.status, "rejected");
    assert.ok(result.reason instanceof SidecarError);
    assert.ok(["sidecar_exited", "not_running"].includes(result.reason.kind), result.reason.message);
    assert.match(result.reason.message, /EPIPE/);
  }
  assert.equal((await client.exited).code, 7);
  await assert.rejects(client.ping(), (error) => error.kind === "not_running");
});

test("stop() escalates to SIGKILL for a process that ignores stdin's end and SIGTERM", async () => {
  const client = fake("stubborn");
  await client.start();
  const started = Date.now();
  const exit = await client.stop({ shutdownTimeoutMs: 1000, exitTimeoutMs: 300, killTimeoutMs: 300 });
  assert.equal(exit.signal, "SIGKILL");
  assert.match(exit.stderrTail, /ignoring SIGTERM/);
  assert.ok(Date.now() - started < 5000);
  assert.equal(client.running, false);
});

test("a throwing onEvent handler ends only its own request", async () => {
  const client = fake("echo");
  await client.start();
  // the fake sends no events, so deliver one the way the client would
  const call = client.request("echo", { n: 1 }, { onEvent: () => { throw new Error("handler bug"); } });
  call._event({ jsonrpc: "2.0", method: "$/log", params: { id: call.id, level: "info", message: "hi" } });
  await assert.rejects(call.result, /handler bug/);
  assert.deepEqual(await client.call("echo", { n: 2 }), { echo: { n: 2 } });
  await client.stop({ shutdownTimeoutMs: 2000 });
});

test("a signal aborted before the request is sent rejects it at once with a CancelledError", async () => {
  const client = fake("echo");
  await client.start();
  const call = client.request("echo", { n: 1 }, { signal: AbortSignal.abort() });
  await assert.rejects(call.result, (error) => error instanceof CancelledError && error.code === -32800 && typeof error.partial === "object");
  await assert.rejects(call.next(), CancelledError);
  await client.stop({ shutdownTimeoutMs: 2000 });
});

test("empty results ({} as ping gets it) resolve each call with a fresh object; an unasked one goes to onUnmatched", async () => {
  const unmatched = [];
  const client = fake("echo", { onUnmatched: (message) => unmatched.push(message) });
  await client.start();
  const results = await Promise.all(Array.from({ length: 50 }, () => client.call("empty")));
  assert.ok(results.every((result) => typeof result === "object" && result !== null && Object.keys(result).length === 0));
  assert.equal(new Set(results).size, 50);
  results[0].changed = true;
  assert.deepEqual(await client.call("empty"), {});
  assert.deepEqual(await client.call("unasked", { n: 1 }), { echo: { n: 1 } });
  assert.deepEqual(unmatched, [{ jsonrpc: "2.0", id: 999_999, result: {} }]);
  await client.stop({ shutdownTimeoutMs: 2000 });
});
