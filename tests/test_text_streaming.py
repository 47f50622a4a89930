"""Stop strings and UTF-8 hold-back, without a model."""

from runtimes.text import StopMatcher, Utf8Stream


def run_stops(stops, pieces):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_string_across_token_boundaries_is_never_emitted():
    assert run_stops(["END"], ["hello E", "N", "D more"]) == ("hello ", True)
    assert run_stops(["\n\n"], ["a\n", "\nb"]) == ("a", True)


def test_a_false_start_is_released():
    text, stopped = run_stops(["END"], ["EN", "X", "ENtry"])
    assert (text, stopped) == ("ENXENtry", False)


def test_the_earliest_of_several_stops_wins():
    assert run_stops(["world", "lo w"], ["hello world"]) == ("hel", True)


def test_no_stops_passes_everything_through():
    assert run_stops([], ["a", "b"]) == ("ab", False)


def test_utf8_stream_holds_partial_code_points():
    stream = Utf8Stream()
    data = "日😀é".encode()
    out = [stream.feed(data[i:i + 1]) for i in range(len(data))]
    assert "".join(out) == "日😀é"
    assert all(len(piece) <= 1 for piece in out) and out.count("") == len(data) - 3
