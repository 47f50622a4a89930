import assert from "node:assert/strict";
import { test } from "node:test";
import { emptyResultId } from "../src/connection.js";

test("the empty-result fast path takes exactly {\"jsonrpc\":\"2.0\",\"id\":N,\"result\":{}} and nothing else", () => {
  for (const id of [0, 1, 7, 42, 1234567, Number.MAX_SAFE_INTEGER]) {
    assert.equal(emptyResultId(`{"jsonrpc":"2.0","id":${id},"result":{}}`), id);
  }
  for (const line of [
    '{"jsonrpc":"2.0","id":,"result":{}}',
    '{"jsonrpc":"2.0","id":07,"result":{}}',
    '{"jsonrpc":"2.0","id":"7","result":{}}',
    '{"jsonrpc":"2.0","id":-7,"result":{}}',
    '{"jsonrpc":"2.0","id":7.5,"result":{}}',
    '{"jsonrpc":"2.0","id":1e3,"result":{}}',
    '{"jsonrpc":"2.0","id":7 ,"result":{}}',
    '{"jsonrpc":"2.0","id":9007199254740992,"result":{}}',
    '{"jsonrpc":"2.0","id":12345678901234567,"result":{}}',
    '{"jsonrpc":"2.0","id":7,"result":{"a":1}}',
    '{"jsonrpc":"2.0","id":7,"result":{} }',
    '{"jsonrpc":"2.0","id":7,"error":{}}',
    '{"jsonrpc":"2.0","id":7,"result":{}},"x":{"jsonrpc":"2.0","id":7,"result":{}}',
    '{"id":7,"jsonrpc":"2.0","result":{}}',
    "",
  ]) {
    assert.equal(emptyResultId(line), -1, line);
  }
});
