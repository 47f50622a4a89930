import assert from "node:assert/strict";
import { test } from "node:test";
import { LineSplitter } from "../src/lines.js";

/** The lines a splitter emits for these chunks (strings are UTF-8 encoded, arrays are bytes). */
function split(...chunks) {
  const lines = [];
  const splitter = new LineSplitter((line) => lines.push(line));
  for (const chunk of chunks) splitter.push(typeof chunk === "string" ? Buffer.from(chunk) : Buffer.from(chunk));
  splitter.end();
  return lines;
}

test("splits on \\n only and keeps U+2028, U+2029, U+0085 and lone \\r inside a line", () => {
  assert.deepEqual(split("a\u2028b\u2029c\u0085d\re\nnext\n"), ["a\u2028b\u2029c\u0085d\re", "next"]);
});

test("joins a line cut across chunks, also inside a multi-byte character", () => {
  const bytes = Buffer.from('{"t":"🦊中é"}\n{"t":2}\n');
  for (let cut = 1; cut < bytes.length; cut++) {
    assert.deepEqual(split(bytes.subarray(0, cut), bytes.subarray(cut)), ['{"t":"🦊中é"}', '{"t":2}'], `cut at ${cut}`);
  }
  const oneByteAtATime = [...bytes].map((byte) => [byte]);
  assert.deepEqual(split(...oneByteAtATime), ['{"t":"🦊中é"}', '{"t":2}']);
});

test("strips one trailing \\r (CRLF)", () => {
  assert.deepEqual(split("a\r\nb\r\r\n"), ["a", "b\r"]);
  assert.deepEqual(split("a\r", "\nb\n"), ["a", "b"]);
});

test("skips blank lines", () => {
  assert.deepEqual(split("\n\r\n  \t\na\n\n"), ["a"]);
});

test("drops a UTF-8 BOM from the first line only", () => {
  assert.deepEqual(split([0xef, 0xbb, 0xbf], "x\n\ufeffy\n"), ["x", "\ufeffy"]);
  assert.deepEqual(split([0xef, 0xbb], [0xbf, 0x7b, 0x7d, 0x0a]), ["{}"]);
});

test("reads an unterminated last line at the end of input", () => {
  assert.deepEqual(split("a\nb"), ["a", "b"]);
});

test("several lines in one chunk and empty chunks", () => {
  assert.deepEqual(split("", "1\n2\n3", "", "\n"), ["1", "2", "3"]);
});
