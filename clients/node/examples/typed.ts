// Type-checked against the declarations: `tsc -p .` (from clients/node). Not run by the tests.

import { CancelledError, ErrorCode, SidecarClient, SidecarError } from "../src/index.js";
import type { GenerateParams, ProgressEvent, TrainResult } from "../src/index.js";

export async function main(repo: string): Promise<void> {
  const client = await SidecarClient.start({ cwd: repo, env: { PYTHONPATH: repo } });
  try {
    const train = client.request("train", { model: "builtin:tiny", data: `${repo}/runtimes/data/demo_chat.jsonl`, preset: "quick", max_steps: 3 });
    for await (const event of train) {
      if (event.method === "$/progress") {
        const progress: ProgressEvent = event.params;
        console.log(progress.stage, progress.step, progress.total, progress.metrics?.loss);
      }
    }
    const trained: TrainResult = await train.result;
    console.log(trained.artifact.id, trained.metrics.train_loss);

    const params: GenerateParams = { model: "builtin:tiny", prompt: "Once", adapters: [{ adapter: trained.artifact.id }] };
    const controller = new AbortController();
    const call = client.request("generate", params, { signal: controller.signal });
    for await (const event of call) {
      if (event.method === "$/token") console.log(event.params.seq, event.params.text);
    }
    const result = await call.result;
    const reason: "stop" | "length" | "cancelled" = result.finish_reason;
    console.log(reason, result.usage.completion_tokens, result.timings.tokens_per_s);

    const info = await client.modelsLoad({ model: "builtin:tiny" }, { timeoutMs: 60_000, onEvent: (event) => console.log(event.method) });
    console.log(info.memory_bytes);
    await client.ping();

    // @ts-expect-error: model is required
    await client.generate({ prompt: "no model" });
    // @ts-expect-error: no such field
    await client.embed({ model: "m", input: "x", temprature: 1 });
    // @ts-expect-error: no such method
    client.request("generat", { model: "m" });
    // @ts-expect-error: max_tokens is a number
    client.request("generate", { model: "m", max_tokens: "many" });
  } catch (error) {
    if (error instanceof CancelledError) console.log(error.partial);
    else if (error instanceof SidecarError && error.code === ErrorCode.REQUEST_FAILED) console.log(error.kind, error.retryable);
  } finally {
    const exit = await client.stop();
    console.log(exit?.code, exit?.signal);
  }
}
