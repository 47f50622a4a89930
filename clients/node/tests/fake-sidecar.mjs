// A stand-in sidecar for the tests that need a process to misbehave on purpose.
// Usage: node fake-sidecar.mjs MODE; every mode answers `initialize`, then:
//   echo      answers each request with {"echo": params}, and `empty` with {} (as ping is answered);
//             `unasked` also writes an empty result for an id nobody sent
//   stubborn  ignores stdin's end and SIGTERM, so only SIGKILL stops it
//   hangup    closes its stdin after initialize and exits with code 7 a moment later

import { createInterface } from "node:readline";

const mode = process.argv[2];
const send = (message) => process.stdout.write(JSON.stringify({ jsonrpc: "2.0", ...message }) + "\n");

if (mode === "stubborn") {
  process.on("SIGTERM", () => process.stderr.write("fake: ignoring SIGTERM\n"));
  setInterval(() => {}, 1000);
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const message = JSON.parse(line);
  if (message.id === undefined) return;
  if (message.method === "initialize") {
    send({ id: message.id, result: { protocolVersion: message.params.protocolVersion, serverInfo: { name: "fake" }, capabilities: { maxMessageBytes: 1 << 30 } } });
    if (mode === "hangup") {
      lines.close();
      process.stdin.destroy();
      setTimeout(() => process.exit(7), 300);
    }
    return;
  }
  if (message.method === "empty") return send({ id: message.id, result: {} });
  if (message.method === "unasked") send({ id: 999_999, result: {} });
  send({ id: message.id, result: { echo: message.params ?? null } });
});
