"""Framing and encoding, without a process."""

import json

from sidecar.wire import LineSplitter, Oversize, encode


def feed_all(splitter: LineSplitter, *chunks: bytes) -> list:
    out = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


def test_splits_on_newline_only_and_strips_one_cr():
    lines = feed_all(LineSplitter(1000), b'{"a":1}\r\n{"b":\r2}\n')
    assert lines == [b'{"a":1}', b'{"b":\r2}']


def test_lines_may_arrive_in_pieces():
    assert feed_all(LineSplitter(1000), b'{"a"', b":1", b"}\n{", b"}\n") == [b'{"a":1}', b"{}"]


def test_blank_lines_are_skipped_and_bom_accepted_on_first_line_only():
    lines = feed_all(LineSplitter(1000), b"\xef\xbb\xbf{}\n\n  \r\n\xef\xbb\xbf{}\n")
    assert lines == [b"{}", b"\xef\xbb\xbf{}"]


def test_oversized_line_is_refused_without_buffering_it():
    splitter = LineSplitter(100)
    out = feed_all(splitter, b"x" * 60, b"x" * 60, b"x" * 10_000, b"tail\n{}\n")
    assert isinstance(out[0], Oversize) and out[1:] == [b"{}"]
    assert len(splitter._buffer) == 0


def test_oversized_complete_line_in_one_chunk():
    out = feed_all(LineSplitter(10), b"0123456789ABC\n{}\n")
    assert isinstance(out[0], Oversize) and out[1:] == [b"{}"]


def test_line_exactly_at_the_limit_is_accepted():
    assert feed_all(LineSplitter(4), b"1234\n") == [b"1234"]


def test_encode_escapes_every_non_ascii_character():
    text = "é\u2028\u2029\u0085日本😀"
    frame = encode({"text": text})
    assert frame.isascii() and frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert json.loads(frame)["text"] == text
    assert b"\\u2028" in frame and b"\\ud83d\\ude00" in frame


def test_a_last_line_without_newline_is_kept_at_end_of_input():
    splitter = LineSplitter(100)
    assert feed_all(splitter, b'{"a":1}\n{"b"', b":2}") == [b'{"a":1}']
    assert splitter.finish() == [b'{"b":2}'] and splitter.finish() == []
