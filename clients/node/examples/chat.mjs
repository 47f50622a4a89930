#!/usr/bin/env node
// A command-line chat over the sidecar: each answer streams as it is generated. Ctrl-C during an
// answer cancels it (what was generated stays in the history); Ctrl-C or Ctrl-D at the prompt quits.
//
//   node examples/chat.mjs [--model builtin:tiny] [--adapter ID] [--max-tokens 200] [--python python3]
//
// Run it where `python3 -m sidecar` works (the repository root on PYTHONPATH, or mlsidecar installed).

import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { CancelledError, SidecarClient, SidecarError } from "../src/index.js";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "builtin:tiny" },
    adapter: { type: "string" },
    "max-tokens": { type: "string", default: "200" },
    python: { type: "string", default: "python3" },
  },
});

const client = new SidecarClient({ command: values.python });
const terminal = createInterface({ input: process.stdin, output: process.stdout });
const lines = terminal[Symbol.asyncIterator](); // from now on, typed (or piped) lines wait their turn
let answering = null; // the AbortController of the answer being generated

terminal.on("SIGINT", () => {
  if (answering) answering.abort();
  else terminal.close();
});

try {
  const info = await client.start();
  console.log(`mlsidecar ${info.serverInfo.version} (pid ${info.serverInfo.pid}); loading ${values.model}...`);
  await client.modelsLoad({ model: values.model }, {
    onEvent: (event) => event.method === "$/progress" && process.stdout.write(`\r${event.params.stage} ${event.params.step ?? ""}/${event.params.total ?? ""}   `),
  });
  console.log("\nready: type a message (Ctrl-C stops an answer, Ctrl-D quits)");

  const messages = [];
  terminal.setPrompt("\nyou> ");
  terminal.prompt();
  for await (const text of lines) {
    if (!text.trim()) {
      terminal.prompt();
      continue;
    }
    messages.push({ role: "user", content: text });
    answering = new AbortController();
    const call = client.request("generate", {
      model: values.model,
      messages,
      max_tokens: Number(values["max-tokens"]),
      adapters: values.adapter ? [{ adapter: values.adapter }] : [],
    }, { signal: answering.signal });
    process.stdout.write("bot> ");
    let answer;
    try {
      for await (const event of call) if (event.method === "$/token") process.stdout.write(event.params.text);
      const result = await call.result;
      answer = result.text;
      process.stdout.write(`\n[${result.usage.completion_tokens} tokens, ${result.timings.tokens_per_s.toFixed(0)} tokens/s]\n`);
    } catch (error) {
      if (!(error instanceof CancelledError)) throw error;
      answer = error.partial.text ?? "";
      process.stdout.write(" [stopped]\n");
    } finally {
      answering = null;
    }
    messages.push({ role: "assistant", content: answer });
    terminal.prompt();
  }
} catch (error) {
  const kind = error instanceof SidecarError && error.kind ? ` (${error.kind})` : "";
  console.error(`\nerror${kind}: ${error.message}`);
  process.exitCode = 1;
} finally {
  terminal.close();
  await client.stop();
}
