// End to end against the real sidecar (python3 -m sidecar --debug). One home for the whole file:
// the first models/load of builtin:tiny builds the model (tens of seconds to minutes), once.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { CancelledError, ErrorCode, SidecarClient, SidecarError } from "../src/index.js";
import { REPO, freshHome, sidecarOptions, startSidecar } from "./sidecar.js";

const MODEL = "builtin:tiny";
const { home, remove } = freshHome();
let client;

before(async () => {
  client = await startSidecar(home);
  await client.modelsLoad({ model: MODEL }); // builds builtin:tiny in this fresh home
}, { timeout: 900_000 });

after(async () => {
  await client?.stop();
  remove();
});

describe("lifecycle", () => {
  test("initialize told us who answers; ping and status work", async () => {
    assert.equal(client.serverInfo.name, "mlsidecar");
    assert.equal(client.serverInfo.pid, client.pid);
    assert.ok(client.capabilities.methods.generate.cancellable);
    assert.deepEqual(await client.ping(), {});
    const status = await client.status();
    assert.ok(Array.isArray(status.jobs));
    assert.ok(status.models.some((model) => model.model === MODEL));
  });

  test("an unsupported protocol version fails start() clearly and stops the process", async () => {
    const old = new SidecarClient(sidecarOptions(home, { protocolVersion: "1999-01-01" }));
    await assert.rejects(old.start(), (error) => {
      assert.equal(error.code, ErrorCode.INVALID_PARAMS);
      assert.equal(error.kind, "unsupported_version");
      assert.match(error.message, /this client speaks protocol 1999-01-01, the sidecar speaks 2026-11-01/);
      assert.deepEqual(error.data.requested, "1999-01-01");
      return true;
    });
    assert.equal(old.running, false);
  });

  test("stop(): shutdown cancels what runs, stdin closes, the process exits 0; start() again works", async () => {
    const own = await startSidecar(home);
    const sleeping = own.request("debug/sleep", { seconds: 30, steps: 30 });
    await waitForEvent(sleeping, (event) => event.params.stage === "sleep");
    const exit = await own.stop();
    assert.equal(exit.code, 0);
    assert.equal(own.running, false);
    await assert.rejects(sleeping.result, CancelledError);
    await assert.rejects(own.ping(), (error) => error.kind === "not_running");
    await own.start();
    assert.deepEqual(await own.ping(), {});
    assert.equal((await own.stop()).code, 0);
  });

  test("a sidecar killed mid-request rejects it with the signal and the stderr tail; a restart serves again", async () => {
    const own = await startSidecar(home);
    await own.debugPrint(); // puts known lines on its stderr
    const sleeping = own.request("debug/sleep", { seconds: 30, steps: 30 });
    await waitForEvent(sleeping, (event) => event.params.stage === "sleep");
    process.kill(own.pid, "SIGKILL");
    await assert.rejects(sleeping.result, (error) => {
      assert.ok(error instanceof SidecarError);
      assert.equal(error.kind, "sidecar_exited");
      assert.equal(error.data.detail.signal, "SIGKILL");
      assert.match(error.data.detail.stderrTail, /debug\/print: print\(\) from the sidecar/);
      assert.match(error.message, /killed by SIGKILL before answering debug\/sleep/);
      return true;
    });
    await own.start();
    assert.deepEqual(await own.ping(), {});
    await own.stop();
  });

  test("two sidecars in one process keep their requests apart", async () => {
    const second = await startSidecar(home);
    try {
      assert.notEqual(second.pid, client.pid);
      const [a, b] = [client.request("debug/stream", { count: 500, text: "a" }), second.request("debug/stream", { count: 700, text: "b" })];
      const [textA, textB] = await Promise.all([collectText(a), collectText(b)]);
      assert.equal(textA, "a".repeat(500));
      assert.equal(textB, "b".repeat(700));
    } finally {
      await second.stop();
    }
  });
});

describe("streaming", () => {
  test("generate streams $/token events before its result, and they add up to the text", async () => {
    let firstTokenAt = 0n;
    const onEvent = (event) => { if (event.method === "$/token") firstTokenAt ||= process.hrtime.bigint(); };
    const call = client.request("generate", { model: MODEL, prompt: "Once upon a time", max_tokens: 200, ignore_eos: true, seed: 1 }, { onEvent });
    const resultAt = call.result.then(() => process.hrtime.bigint());
    let text = "";
    let seq = 0;
    for await (const event of call) {
      if (event.method !== "$/token") continue;
      assert.equal(event.params.seq, seq++);
      text += event.params.text;
    }
    const result = await call.result;
    const leadMs = Number((await resultAt) - firstTokenAt) / 1e6;
    assert.ok(firstTokenAt > 0n && leadMs > 2, `the first token came ${leadMs} ms before the result`);
    assert.equal(text, result.text);
    assert.equal(result.usage.completion_tokens, 200);
  });

  test("aborting a generate sends $/cancel; the call rejects with CancelledError and the partial text", async () => {
    const controller = new AbortController();
    const call = client.request("generate", { model: MODEL, prompt: "The fox", max_tokens: 2000, ignore_eos: true }, { signal: controller.signal });
    let text = "";
    let tokens = 0;
    await assert.rejects(async () => {
      for await (const event of call) {
        if (event.method !== "$/token") continue;
        text += event.params.text;
        if (++tokens === 5) controller.abort();
      }
    }, CancelledError);
    const error = await call.result.catch((reason) => reason);
    assert.ok(error instanceof CancelledError);
    assert.equal(error.code, ErrorCode.CANCELLED);
    assert.ok(error.partial.text.startsWith(text), "the partial text begins with what was streamed");
    assert.ok(error.partial.usage.completion_tokens < 2000);
  });

  test("emoji, CJK and U+2028/U+2029/U+0085 arrive intact, both ways", async () => {
    const sample = "🦊 中文 é \u2028 \u2029 \u0085 👩‍👩‍👧 ";
    const tokens = [];
    const result = await client.debugStream({ count: 50, text: sample }, { onEvent: (event) => tokens.push(event.params.text) });
    assert.equal(result.text, sample);
    assert.equal(tokens.length, 50);
    assert.ok(tokens.every((token) => token === sample));
  });

  test("the convenience call passes events to onEvent without buffering them", async () => {
    const seen = [];
    const result = await client.debugStream({ count: 3, text: "x" }, { onEvent: (event) => seen.push(event.params.seq) });
    assert.deepEqual(result, { count: 3, text: "x" });
    assert.deepEqual(seen, [0, 1, 2]);
  });
});

describe("long jobs", () => {
  test("train streams $/progress and returns its result", { timeout: 600_000 }, async () => {
    const call = client.request("train", {
      model: MODEL, data: `${REPO}/runtimes/data/demo_chat.jsonl`, preset: "quick", max_steps: 3,
    });
    const stages = new Set();
    let trainSteps = 0;
    for await (const event of call) {
      if (event.method !== "$/progress") continue;
      stages.add(event.params.stage);
      if (event.params.stage === "train" && event.params.step > 0) trainSteps = event.params.step;
    }
    const result = await call.result;
    assert.ok(stages.has("train"), [...stages].join(","));
    assert.equal(trainSteps, 3);
    assert.equal(result.metrics.steps, 3);
    assert.equal(result.stopped, "max_steps");
    assert.equal(result.artifact.kind, "adapter");
  });

  test("a per-request timeout cancels the request and rejects with kind timeout", async () => {
    const started = Date.now();
    await assert.rejects(client.debugSleep({ seconds: 20, steps: 20 }, { timeoutMs: 500 }), (error) => {
      assert.equal(error.kind, "timeout");
      assert.equal(error.retryable, true);
      return true;
    });
    assert.ok(Date.now() - started < 5000);
    assert.deepEqual(await client.ping(), {});
  });
});

describe("errors", () => {
  test("an unknown model is -32803 with kind model_not_found", async () => {
    await assert.rejects(client.generate({ model: "nobody/nothing", prompt: "hi" }), (error) => {
      assert.ok(error instanceof SidecarError);
      assert.equal(error.code, ErrorCode.REQUEST_FAILED);
      assert.equal(error.kind, "model_not_found");
      assert.equal(error.retryable, false);
      assert.equal(error.method, "generate");
      return true;
    });
  });

  test("an unknown field is -32602 naming it", async () => {
    await assert.rejects(client.call("generate", { model: MODEL, prompt: "hi", temprature: 1 }), (error) => {
      assert.equal(error.code, ErrorCode.INVALID_PARAMS);
      assert.equal(error.data.field, "params.temprature");
      return true;
    });
  });

  test("an unknown method is -32601; a missing data file has its kind", async () => {
    await assert.rejects(client.call("no/such/method"), (error) => error.code === ErrorCode.METHOD_NOT_FOUND);
    await assert.rejects(client.datasetsInspect({ data: `${REPO}/no-such-file.jsonl` }), (error) => {
      assert.equal(error.code, ErrorCode.REQUEST_FAILED);
      assert.equal(error.kind, "file_not_found");
      return true;
    });
  });

  test("a request over maxMessageBytes is refused before it is sent", async () => {
    const limit = client.capabilities.maxMessageBytes;
    await assert.rejects(client.embed({ model: MODEL, input: "x".repeat(limit) }), (error) => {
      assert.equal(error.code, ErrorCode.INVALID_REQUEST);
      assert.equal(error.data.maxMessageBytes, limit);
      return true;
    });
    assert.deepEqual(await client.ping(), {});
  });
});

/** Reads a call's events until one matches (the rest stay unread). */
async function waitForEvent(call, predicate) {
  for (;;) {
    const { value, done } = await call.next();
    if (done) throw new Error(`${call.method} ended before the awaited event`);
    if (predicate(value)) return value;
  }
}

async function collectText(call) {
  let text = "";
  for await (const event of call) if (event.method === "$/token") text += event.params.text;
  return text;
}
