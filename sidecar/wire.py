"""The wire: stdio isolation, NDJSON framing, and the one writer that owns the output stream.

The framing rules are PROTOCOL.md's: split on 0x0A only, strip one trailing CR, skip blank lines,
accept a BOM on the first line, refuse a line over the size limit without holding it in memory.
Output is compact JSON with every non-ASCII character escaped, so no line splitter a host uses
can break a frame.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_NON_ASCII = re.compile("[^\x00-\x7f]")
BOM = b"\xef\xbb\xbf"


def isolate_stdio() -> tuple[int, int]:
    """Move the wire to private descriptors, then point fd 1 at stderr and fd 0 at /dev/null.

    Done before any heavy import, so a print, a progress bar or a C library writing to fd 1 lands
    on stderr and can never corrupt the stream; child processes inherit the same safe fds.
    """
    wire_in = os.dup(0)
    wire_out = os.dup(1)
    os.set_inheritable(wire_in, False)
    os.set_inheritable(wire_out, False)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull)  # noqa: SIM115 - replaces the interpreter's stdin for good
    return wire_in, wire_out


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def encode(message: Any) -> bytes:
    """One frame: compact JSON, ASCII only, ending in a newline."""
    data = _encoder.encode(message)
    if not data.isascii():
        data = _NON_ASCII.sub(_escape, data.decode("utf-8")).encode("ascii")
    return data + b"\n"


def decode(line: bytes) -> Any:
    return _decoder.decode(line)


class Oversize:
    """Marker yielded for a line that exceeded the size limit and was discarded."""

    def __init__(self, size_at_least: int) -> None:
        self.size_at_least = size_at_least


class LineSplitter:
    """Sans-IO NDJSON splitter with a size limit; memory stays bounded by the limit plus one chunk."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._discarding = False
        self._discarded = 0
        self._first = True

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        out: list[bytes | Oversize] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                self._take_partial(data[start:], out)
                return out
            if self._discarding:
                self._discarding = False
                self._discarded = 0
            elif len(self._buffer) + newline - start > self.max_bytes:
                self._buffer.clear()
                out.append(Oversize(newline - start))
            else:
                if self._buffer:
                    self._buffer += data[start:newline]
                    line = bytes(self._buffer)
                    self._buffer.clear()
                else:
                    line = data[start:newline]
                self._emit(line, out)
            start = newline + 1

    def finish(self) -> list[bytes | Oversize]:
        """At end of input: a last line without its newline still counts."""
        if self._discarding or not self._buffer:
            return []
        line, out = bytes(self._buffer), []
        self._buffer.clear()
        self._emit(line, out)
        return out

    def _take_partial(self, tail: bytes, out: list[bytes | Oversize]) -> None:
        if self._discarding:
            self._discarded += len(tail)
            return
        if len(self._buffer) + len(tail) > self.max_bytes:
            out.append(Oversize(len(self._buffer) + len(tail)))
            self._buffer.clear()
            self._discarding = True
            return
        self._buffer += tail

    def _emit(self, line: bytes, out: list[bytes | Oversize]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._first:
            self._first = False
            if line.startswith(BOM):
                line = line[len(BOM) :]
        if line.strip():
            out.append(line)


class WireWriter:
    """The single owner of the output stream.

    Frames are queued and written by the event loop in one batch per loop iteration, through a
    non-blocking pipe transport (or a writer thread when stdout is a regular file), so writes never
    block the loop and frames never interleave.
    """

    HIGH_WATER = 1 << 20

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._transport: asyncio.WriteTransport | None = None
        self._thread_queue: list[bytes] | None = None
        self._thread_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closed = False
        self.broken = False

    async def open(self, fd: int) -> None:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
            pipe = os.fdopen(fd, "wb", buffering=0)
            self._transport, _ = await self._loop.connect_write_pipe(lambda: _WriteProtocol(self), pipe)
            self._transport.set_write_buffer_limits(high=self.HIGH_WATER)
        else:
            self._thread_queue = []
            self._thread = threading.Thread(target=self._thread_writer, args=(fd,), name="wire-writer", daemon=True)
            self._thread.start()

    def send(self, frame: bytes) -> None:
        """Queue one encoded frame; must be called on the loop thread."""
        if self._closed:
            return
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        if self._pending_bytes >= 1 << 16:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if self.broken:
            return
        if self._transport is not None:
            if not self._transport.is_closing():
                self._transport.write(data)
        elif self._thread_queue is not None:
            with self._thread_cond:
                self._thread_queue.append(data)
                self._thread_cond.notify()

    async def drain(self) -> None:
        """Wait while the host is not reading (backpressure for event producers)."""
        if not self._resumed.is_set():
            await self._resumed.wait()

    async def close(self, timeout: float = 5.0) -> None:
        """Flush everything queued and wait until it is handed to the OS."""
        self.flush()
        self._closed = True
        if self._transport is not None:
            deadline = self._loop.time() + timeout
            while self._transport.get_write_buffer_size() and not self.broken and self._loop.time() < deadline:
                await asyncio.sleep(0.005)
            self._transport.close()
        elif self._thread is not None:
            with self._thread_cond:
                self._thread_queue.append(b"")  # type: ignore[union-attr]
                self._thread_cond.notify()
            await asyncio.to_thread(self._thread.join, timeout)

    def _thread_writer(self, fd: int) -> None:
        while True:
            with self._thread_cond:
                while not self._thread_queue:
                    self._thread_cond.wait()
                chunks = self._thread_queue[:]
                self._thread_queue.clear()  # type: ignore[union-attr]
            for chunk in chunks:
                if not chunk:
                    return
                view = memoryview(chunk)
                while view:
                    try:
                        view = view[os.write(fd, view) :]
                    except OSError:
                        self.broken = True
                        return


class _WriteProtocol(asyncio.Protocol):
    def __init__(self, writer: WireWriter) -> None:
        self._writer = writer

    def pause_writing(self) -> None:
        self._writer._resumed.clear()

    def resume_writing(self) -> None:
        self._writer._resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._writer.broken = True
        self._writer._resumed.set()


class _ReadProtocol(asyncio.Protocol):
    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None]) -> None:
        self._on_data = on_data
        self._on_eof = on_eof

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_eof()


async def open_reader(
    loop: asyncio.AbstractEventLoop, fd: int, on_data: Callable[[bytes], None], on_eof: Callable[[], None]
) -> None:
    """Deliver input chunks to on_data on the loop thread; pipes are read by the loop itself,
    regular files (`python -m sidecar < requests.jsonl`) by a thread."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        pipe = os.fdopen(fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: _ReadProtocol(on_data, on_eof), pipe)
        return

    def pump() -> None:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                loop.call_soon_threadsafe(on_eof)
                return
            loop.call_soon_threadsafe(on_data, chunk)

    threading.Thread(target=pump, name="wire-reader", daemon=True).start()
