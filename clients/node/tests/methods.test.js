// The generated method table matches protocol/schema.json (regenerate with `python -m protocol.codegen`).

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { ERROR_KINDS, ErrorCode, METHODS, PROTOCOL_VERSION, SidecarClient } from "../src/index.js";

const schema = JSON.parse(readFileSync(new URL("../../../protocol/schema.json", import.meta.url), "utf8"));
const jsName = (method) => method.replace(/[/_.-](.)/g, (_, next) => next.toUpperCase());

test("the generated files are current with protocol/schema.json", () => {
  assert.equal(PROTOCOL_VERSION, schema.protocolVersion);
  assert.deepEqual(Object.keys(METHODS).sort(), Object.keys(schema.methods).sort());
  for (const [method, entry] of Object.entries(schema.methods)) {
    assert.equal(METHODS[method].runsIn, entry.runs_in, method);
    assert.equal(typeof SidecarClient.prototype[jsName(method)], "function", `${method} has a convenience method`);
  }
});

test("error codes and kinds are exported", () => {
  assert.equal(ErrorCode.CANCELLED, -32800);
  assert.equal(ErrorCode.REQUEST_FAILED, -32803);
  assert.ok(ERROR_KINDS.includes("model_not_found"));
});
