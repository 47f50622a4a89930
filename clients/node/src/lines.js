// Splits a byte stream into lines on 0x0A only. readline would also split on U+2028/U+2029 and
// decode across chunk boundaries; here each complete line is decoded once, so a multi-byte
// character cut by a chunk boundary is whole again before it is decoded.

const LF = 0x0a;
const CR = 0x0d;

export class LineSplitter {
  /** @param {(line: string) => void} onLine called with each non-blank line, without its ending */
  constructor(onLine) {
    this.onLine = onLine;
    this.parts = []; // bytes of an unfinished line, as received
    this.first = true; // a UTF-8 BOM is dropped from the first line only
  }

  /** @param {Uint8Array} chunk */
  push(chunk) {
    if (!Buffer.isBuffer(chunk)) chunk = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    let end = chunk.indexOf(LF);
    if (end !== -1 && end === chunk.length - 1 && this.parts.length === 0) {
      // the common case (a ping's answer, most events): the chunk is exactly one whole line
      this.#emit(chunk, 0, end);
      return;
    }
    let start = 0;
    while (end !== -1) {
      if (this.parts.length > 0) {
        this.parts.push(chunk.subarray(start, end));
        const line = Buffer.concat(this.parts);
        this.parts = [];
        this.#emit(line, 0, line.length);
      } else {
        this.#emit(chunk, start, end);
      }
      start = end + 1;
      end = chunk.indexOf(LF, start);
    }
    if (start < chunk.length) this.parts.push(chunk.subarray(start));
  }

  /** The end of input: an unterminated last line still counts. */
  end() {
    if (this.parts.length === 0) return;
    const line = Buffer.concat(this.parts);
    this.parts = [];
    this.#emit(line, 0, line.length);
  }

  #emit(buffer, start, end) {
    if (this.first) {
      this.first = false;
      if (end - start >= 3 && buffer[start] === 0xef && buffer[start + 1] === 0xbb && buffer[start + 2] === 0xbf) start += 3;
    }
    if (end > start && buffer[end - 1] === CR) end -= 1;
    if (end === start) return;
    const line = buffer.toString("utf8", start, end);
    if (line.charCodeAt(0) <= 0x20 && line.trim() === "") return;
    this.onLine(line);
  }
}
