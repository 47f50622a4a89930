// Client overhead, measured against the real sidecar (python3 -m sidecar --debug):
//   (a) ping round trips through the client vs the same pings written and read on the child's
//       pipes by hand, two ways: "raw bytes" waits for the newline only, "raw JSON" also splits
//       and JSON.parses the line (what any consumer must do). Target: client / raw JSON <= 1.05.
//   (b) $/token events per second delivered to a `for await` loop from one debug/stream request
//       (target: at least 50,000/s), next to the rate of the raw pipe with JSON.parse.
// The contestants take turns in blocks of 200 sequential pings, so neighbouring blocks see the same
// background load (the machine may be shared); the ratio is the median of the per-round ratios.
// Every run starts fresh sidecars, so no contestant keeps a faster-placed process throughout.
// Usage: node bench/bench.mjs [--pings 2000] [--runs 7] [--tokens 200000] [--token-runs 3] [--home DIR] [--json FILE]
//   --home: the sidecars' MLSIDECAR_HOME (default: a fresh temporary directory, removed at the end)
//   --json: also write the report to FILE (bench/clients.py reads it)
// Also reported: the median of the per-ping round trips of each contestant (ping_median_us), the
// statistic bench/protocol.py and bench/clients.py compare.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { SidecarClient } from "../src/index.js";

const { values } = parseArgs({
  options: {
    pings: { type: "string", default: "2000" }, runs: { type: "string", default: "7" }, tokens: { type: "string", default: "200000" },
    "token-runs": { type: "string", default: "3" }, home: { type: "string" }, json: { type: "string" },
  },
});
const PINGS = Number(values.pings);
const RUNS = Number(values.runs);
const TOKENS = Number(values.tokens);
const TOKEN_RUNS = Number(values["token-runs"]);

const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const home = values.home ?? mkdtempSync(join(tmpdir(), "mlsidecar-node-bench-"));
const command = process.env.MLSIDECAR_PYTHON ?? "python3";
const args = ["-m", "sidecar", "--debug"];
const env = {
  ...process.env, PYTHONPATH: REPO, MLSIDECAR_HOME: home, HF_HUB_OFFLINE: "1",
  OMP_NUM_THREADS: "1", OMP_WAIT_POLICY: "PASSIVE", MLSIDECAR_LOG_LEVEL: "WARNING",
};

const median = (xs) => Float64Array.from(xs).sort()[Math.floor(xs.length / 2)];
const min = (xs) => Math.min(...xs);

/** The sidecar's pipes with nothing in between: write a line, wait for `lines` lines back. */
function rawPipe({ parse }) {
  const child = spawn(command, args, { cwd: REPO, env, stdio: ["pipe", "pipe", "pipe"] });
  child.stderr.resume(); // drained, as the client drains it
  let waiting = null; // { lines, resolve }
  let carry = null; // the start of a line cut by a chunk boundary
  child.stdout.on("data", (chunk) => {
    let start = 0;
    for (let at = chunk.indexOf(10); at !== -1 && waiting; at = chunk.indexOf(10, start)) {
      if (parse) {
        const line = carry ? Buffer.concat([carry, chunk.subarray(start, at)]) : chunk.subarray(start, at);
        carry = null;
        JSON.parse(line.toString("utf8"));
      }
      start = at + 1;
      if (--waiting.lines === 0) {
        const { resolve } = waiting;
        waiting = null;
        resolve();
      }
    }
    if (parse && start < chunk.length) carry = carry ? Buffer.concat([carry, chunk.subarray(start)]) : chunk.subarray(start);
  });
  const send = (line, lines = 1) => new Promise((resolve) => {
    waiting = { lines, resolve };
    child.stdin.write(line);
  });
  const close = () => new Promise((resolve) => {
    child.on("exit", resolve);
    child.stdin.end();
  });
  return { send, close };
}

/**
 * One run of `count` pings per contestant, in blocks of BLOCK taken in turns (rotating order):
 * the µs per ping of each block, and per round the ratio of the client to each raw contestant.
 */
const BLOCK = 200;
async function pingRun(contestants, count) {
  const names = Object.keys(contestants);
  const perPing = Object.fromEntries(names.map((name) => [name, []]));
  const single = Object.fromEntries(names.map((name) => [name, []]));
  for (let round = 0; round < count / BLOCK; round++) {
    for (let turn = 0; turn < names.length; turn++) {
      const name = names[(round + turn) % names.length];
      const call = contestants[name];
      const times = single[name];
      const started = process.hrtime.bigint();
      for (let i = 1; i <= BLOCK; i++) {
        const t0 = process.hrtime.bigint();
        await call(round * BLOCK + i);
        times.push(Number(process.hrtime.bigint() - t0) / 1e3);
      }
      perPing[name].push(Number(process.hrtime.bigint() - started) / 1e3 / BLOCK);
    }
  }
  return { perPing, single };
}

async function clientTokens(client, count) {
  const started = process.hrtime.bigint();
  const call = client.request("debug/stream", { count, text: "tok " });
  let seen = 0;
  for await (const event of call) if (event.method === "$/token") seen++;
  await call.result;
  if (seen !== count) throw new Error(`expected ${count} tokens, got ${seen}`);
  return count / (Number(process.hrtime.bigint() - started) / 1e9);
}

async function rawTokens(raw, count, run) {
  const started = process.hrtime.bigint();
  await raw.send(`{"jsonrpc":"2.0","id":"t${run}","method":"debug/stream","params":{"count":${count},"text":"tok "}}\n`, count + 1);
  return count / (Number(process.hrtime.bigint() - started) / 1e9);
}

/** Fresh sidecars for every contestant, so no contestant keeps a luckier process all along. */
async function startContestants() {
  const rawBytes = rawPipe({ parse: false });
  const rawJson = rawPipe({ parse: true });
  const client = await SidecarClient.start({ command, args, cwd: REPO, env });
  const contestants = {
    raw_bytes: (id) => rawBytes.send(`{"jsonrpc":"2.0","id":${id},"method":"ping"}\n`),
    raw_json: (id) => rawJson.send(`{"jsonrpc":"2.0","id":${id},"method":"ping"}\n`),
    client: () => client.ping(),
  };
  const stop = () => Promise.all([client.stop(), rawBytes.close(), rawJson.close()]);
  return { rawJson, client, contestants, stop };
}

try {
  const runs = [];
  const singles = [];
  for (let run = 0; run < RUNS; run++) {
    const { contestants, stop } = await startContestants();
    await pingRun(contestants, 600); // warm up
    const { perPing, single } = await pingRun(contestants, PINGS);
    runs.push(perPing);
    singles.push(single);
    await stop();
  }
  const blocks = (name) => runs.flatMap((run) => run[name]);
  const ratios = (base) => runs.flatMap((run) => run.client.map((us, round) => us / run[base][round]));
  const names = Object.keys(runs[0]);
  const pingMedians = Object.fromEntries(names.map((name) => [name, median(singles.flatMap((run) => run[name]))]));

  const tokens = { raw_json: [], client: [] };
  if (TOKEN_RUNS > 0) { // --token-runs 0: pings only
    const { rawJson, client, stop } = await startContestants();
    for (let run = 0; run < TOKEN_RUNS; run++) {
      tokens.raw_json.push(await rawTokens(rawJson, TOKENS, run));
      tokens.client.push(await clientTokens(client, TOKENS));
    }
    await stop();
  }

  const report = {
    pings_per_run: PINGS,
    runs: RUNS,
    block: BLOCK,
    ping_us: Object.fromEntries(names.map((name) => [name, median(blocks(name))])),
    ping_median_us: pingMedians,
    ratio_client_to_raw_json: median(ratios("raw_json")),
    ratio_client_to_raw_bytes: median(ratios("raw_bytes")),
    ratio_of_run_medians: runs.map((run) => median(run.client) / median(run.raw_json)),
    tokens: TOKENS,
    tokens_per_s: TOKEN_RUNS > 0 ? { raw_json: median(tokens.raw_json), client: median(tokens.client) } : null,
    detail: { tokens_per_s: tokens },
  };
  const row = (name, value, target = "") => console.log(`${name.padEnd(40)}${value.padStart(18)}   ${target}`);
  const us = (name) => `${report.ping_us[name].toFixed(1)} µs`;
  row(`${RUNS} runs of ${PINGS} pings, blocks of ${BLOCK} in turns`, "median", "target");
  row("ping, raw pipe, bytes only", us("raw_bytes"));
  row("ping, raw pipe, line + JSON.parse", us("raw_json"));
  row("ping through the client", us("client"));
  row("client / raw JSON (per round)", report.ratio_client_to_raw_json.toFixed(3), "<= 1.05");
  row("client / raw bytes (per round)", report.ratio_client_to_raw_bytes.toFixed(3));
  if (report.tokens_per_s) {
    row(`$/token, raw pipe + JSON.parse (${TOKENS})`, `${Math.round(report.tokens_per_s.raw_json)}/s`);
    row("$/token to a for-await loop", `${Math.round(report.tokens_per_s.client)}/s`, ">= 50000/s");
  }
  row("ping through the client, per-ping median", `${report.ping_median_us.client.toFixed(1)} µs`);
  console.log(JSON.stringify(report));
  if (values.json) writeFileSync(values.json, JSON.stringify(report, null, 2) + "\n");
} finally {
  if (!values.home) rmSync(home, { recursive: true, force: true });
}
