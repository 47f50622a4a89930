"""Reading training data: every file type and format, detection, column mapping, problems by row, splits."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from runtimes.train.sft_data import DatasetInvalid, Example, Problem, load_dataset, split_examples

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
DEMO = Path(__file__).resolve().parents[1] / "runtimes" / "data" / "demo_chat.jsonl"


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_delimited(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows_of(problems: list[Problem]) -> list[int]:
    return [p.row for p in problems]


# ----- file types


def test_jsonl_chat_with_problems_numbered_by_line_blank_lines_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CHAT},
        "not json at all",
        [1, 2],
        {"messages": CHAT},
    ], blank_after=1)  # line 2 is blank: the bad lines are 3 and 4, the last good one line 5
    loaded = load_dataset(path)
    assert (loaded.file_type, loaded.format, loaded.rows) == ("jsonl", "chat", 4)
    assert [e.row for e in loaded.examples] == [1, 5]
    assert loaded.examples[0] == Example(1, "chat", messages=CHAT)
    assert rows_of(loaded.problems) == [3, 4]
    assert "not valid JSON" in loaded.problems[0].reason and "got list" in loaded.problems[1].reason
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_ndjson_extension_is_jsonl(tmp_path):
    loaded = load_dataset(write_jsonl(tmp_path / "d.ndjson", [{"text": "a"}, {"text": "b"}]))
    assert (loaded.file_type, loaded.format, len(loaded.examples)) == ("jsonl", "text", 2)


def test_json_array_and_object_with_one_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, "two", {"text": "three"}]))
    loaded = load_dataset(tmp_path / "a.json")
    assert (loaded.file_type, loaded.rows, [e.text for e in loaded.examples]) == ("json", 3, ["one", "three"])
    assert loaded.problems == [Problem(2, "must be a JSON object with the row's fields, got str")]

    (tmp_path / "b.json").write_text(json.dumps({"version": 2, "data": [{"prompt": "p", "completion": "c"}]}, indent=2))
    loaded = load_dataset(tmp_path / "b.json")
    assert loaded.format == "completions" and loaded.examples == [Example(1, "completion", prompt="p", completion="c")]


def test_json_object_with_several_lists_is_refused(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": [{"text": "a"}], "test": [{"text": "b"}]}))
    with pytest.raises(DatasetInvalid, match="several lists"):
        load_dataset(tmp_path / "c.json")


def test_json_lines_saved_as_json_are_read(tmp_path):
    loaded = load_dataset(write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}]))
    assert loaded.file_type == "jsonl" and [e.text for e in loaded.examples] == ["a", "b"]


def test_broken_json_says_where(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DatasetInvalid, match=r"not valid JSON \(line 2"):
        load_dataset(tmp_path / "bad.json")


def test_csv_completions_with_quoted_multiline_cells_and_header_excluded_numbering(tmp_path):
    path = write_delimited(tmp_path / "d.csv", ["prompt", "completion"], [
        ["Say hi,\nplease", "Hi, there"],
        ["Only a prompt", ""],
        ["a", "b", "extra"],
        ["Q", "A"],
    ])
    loaded = load_dataset(path)
    assert (loaded.file_type, loaded.format, loaded.rows) == ("csv", "completions", 4)
    assert loaded.examples[0] == Example(1, "completion", prompt="Say hi,\nplease", completion="Hi, there")
    assert [e.row for e in loaded.examples] == [1, 4]
    assert loaded.problems[0] == Problem(2, "completion is empty")
    assert loaded.problems[1].row == 3 and "more cell(s) than the header" in loaded.problems[1].reason


def test_csv_messages_cell_is_json_text(tmp_path):
    path = write_delimited(tmp_path / "d.csv", ["messages"], [[json.dumps(CHAT)], ["[not json"], ["hello"]])
    loaded = load_dataset(path)
    assert loaded.format == "chat" and loaded.examples == [Example(1, "chat", messages=CHAT)]
    assert rows_of(loaded.problems) == [2, 3]
    assert "messages cell is not valid JSON" in loaded.problems[0].reason


@pytest.mark.parametrize("suffix", [".tsv", ".tab"])
def test_tsv_text(tmp_path, suffix):
    path = write_delimited(tmp_path / f"d{suffix}", ["id", "text"], [["1", "first, with a comma"], ["2", "second"]], "\t")
    loaded = load_dataset(path)
    assert (loaded.file_type, loaded.format) == ("tsv", "text")
    assert [e.text for e in loaded.examples] == ["first, with a comma", "second"]


def test_parquet_chat_alpaca_and_json_text_cells(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": [{"role": "user", "content": "x"}]}]),
                   tmp_path / "chat.parquet")
    loaded = load_dataset(tmp_path / "chat.parquet")
    assert (loaded.file_type, loaded.format, loaded.rows) == ("parquet", "chat", 2)
    assert loaded.examples == [Example(1, "chat", messages=CHAT)]
    assert loaded.problems[0].row == 2 and "no assistant turn" in loaded.problems[0].reason

    pq.write_table(pa.Table.from_pylist([{"instruction": "Add", "input": "2 and 2", "output": "4"},
                                         {"instruction": "Greet", "input": None, "output": "Hello"}]), tmp_path / "alpaca.parquet")
    loaded = load_dataset(tmp_path / "alpaca.parquet")
    assert loaded.format == "alpaca"
    assert [e.messages for e in loaded.examples] == [
        [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hello"}]]

    pq.write_table(pa.Table.from_pylist([{"dialog": json.dumps(CHAT)}]), tmp_path / "strings.parquet")
    loaded = load_dataset(tmp_path / "strings.parquet", columns={"messages": "dialog"})
    assert loaded.examples == [Example(1, "chat", messages=CHAT)]


def test_corrupt_parquet_is_dataset_invalid(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetInvalid, match="cannot be read as Parquet"):
        load_dataset(tmp_path / "broken.parquet")


def test_unknown_extension_is_sniffed(tmp_path):
    write_jsonl(tmp_path / "lines.txt", [{"text": "a"}])
    (tmp_path / "array.data").write_text('  [{"text": "b"}]')
    (tmp_path / "pretty.dat").write_text(json.dumps({"rows": [{"text": "c"}]}, indent=2))
    assert load_dataset(tmp_path / "lines.txt").file_type == "jsonl"
    assert load_dataset(tmp_path / "array.data").file_type == "json"
    pretty = load_dataset(tmp_path / "pretty.dat")
    assert pretty.file_type == "json" and [e.text for e in pretty.examples] == ["c"]
    (tmp_path / "notes.txt").write_text("just some prose\n")
    with pytest.raises(DatasetInvalid, match=r"name it \.jsonl.*or pass file_type"):
        load_dataset(tmp_path / "notes.txt")


def test_explicit_file_type_overrides_the_extension(tmp_path):
    write_delimited(tmp_path / "d.txt", ["text"], [["hello"]], "\t")
    loaded = load_dataset(tmp_path / "d.txt", file_type="tsv")
    assert (loaded.file_type, [e.text for e in loaded.examples]) == ("tsv", ["hello"])


def test_missing_file_directory_empty_and_non_utf8(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetInvalid, match="is a directory"):
        load_dataset(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetInvalid, match="has no rows"):
        load_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetInvalid, match="not UTF-8"):
        load_dataset(tmp_path / "latin.jsonl")


# ----- formats


def test_sharegpt_roles_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "model", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
    ])
    loaded = load_dataset(path)
    assert loaded.format == "sharegpt"
    assert loaded.examples[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hey"}]
    assert [m["role"] for m in loaded.examples[1].messages] == ["user", "assistant"]
    assert loaded.problems[0].row == 3 and "'robot'" in loaded.problems[0].reason and "gpt" in loaded.problems[0].reason


def test_alpaca_with_system_and_empty_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "You translate."},
        {"instruction": "Count to two", "input": "", "output": "1, 2"},
        {"instruction": "No answer", "input": ""},
    ])
    loaded = load_dataset(path)
    assert loaded.format == "alpaca"
    assert loaded.examples[0].messages == [{"role": "system", "content": "You translate."},
                                           {"role": "user", "content": "Translate\n\nbonjour"},
                                           {"role": "assistant", "content": "hello"}]
    assert loaded.examples[1].messages[0] == {"role": "user", "content": "Count to two"}
    assert loaded.problems == [Problem(3, "missing field 'output' that alpaca data needs")]


def test_trl_conversational_prompt_completion_is_chat(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
        {"prompt": "plain", "completion": "text"},
    ])
    loaded = load_dataset(path)
    assert loaded.format == "completions"
    assert loaded.examples[0] == Example(1, "chat", messages=CHAT)
    assert loaded.examples[1] == Example(2, "completion", prompt="plain", completion="text")


def test_csv_prompt_that_starts_with_a_bracket_stays_text(tmp_path):
    path = write_delimited(tmp_path / "d.csv", ["prompt", "completion"], [["[INST] hi [/INST]", "hello"]])
    assert load_dataset(path).examples == [Example(1, "completion", prompt="[INST] hi [/INST]", completion="hello")]


def test_chat_problems_say_what_and_where(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": "Hi there"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "   "}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
        {"messages": CHAT},
        {"messages": ["Hi"]},
        {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]},
    ])
    loaded = load_dataset(path)
    reasons = {p.row: p.reason for p in loaded.problems}
    assert [e.row for e in loaded.examples] == [8]
    assert reasons[1] == "messages must be a list of {role, content} objects, got str"
    assert "unknown role 'bot'" in reasons[2] and "system, user, assistant" in reasons[2]
    assert reasons[3] == "message 2 (assistant) of messages has empty content"
    assert "system turn may only come first" in reasons[4]
    assert "no assistant turn" in reasons[5]
    assert reasons[6] == "message 1 (user) of messages: content must be a string, got number"
    assert "empty list" in reasons[7]
    assert "item 1 is str" in reasons[9]
    assert "has no role" in reasons[10]


def test_sharegpt_role_in_openai_messages_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
                                              {"messages": CHAT}])
    assert "pass format sharegpt" in load_dataset(path).problems[0].reason


def test_text_type_errors(tmp_path):
    loaded = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": 5}, {"text": ""}, {"text": None}]))
    assert loaded.problems == [Problem(2, "text must be a string, got number"), Problem(3, "text is empty"),
                               Problem(4, "text must be a string, got null")]


# ----- detection, overrides, column mapping


def test_detection_majority_wins_and_minority_rows_are_problems(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"prompt": "p", "completion": "c"}, {"text": "b"}, {"text": "c"}])
    loaded = load_dataset(path)
    assert loaded.format == "text" and [e.row for e in loaded.examples] == [1, 3, 4]
    assert loaded.problems == [Problem(2, "missing field 'text' that text data needs")]


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"text": "flat", "messages": CHAT}])
    assert load_dataset(path).format == "chat"
    loaded = load_dataset(path, format="text")
    assert loaded.format == "text" and loaded.examples == [Example(1, "text", text="flat")]


def test_column_mapping(tmp_path):
    qa = write_delimited(tmp_path / "qa.csv", ["question", "answer"], [["Why?", "Because."]])
    loaded = load_dataset(qa, columns={"prompt": "question", "completion": "answer"})
    assert loaded.format == "completions" and loaded.examples == [Example(1, "completion", prompt="Why?", completion="Because.")]
    dialog = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": CHAT}])
    assert load_dataset(dialog, columns={"messages": "dialog"}).examples == [Example(1, "chat", messages=CHAT)]
    body = write_jsonl(tmp_path / "body.jsonl", [{"body": "hello"}, {"title": "no body"}])
    loaded = load_dataset(body, columns={"text": "body"})
    assert loaded.examples == [Example(1, "text", text="hello")]
    assert loaded.problems == [Problem(2, "missing field 'text' (mapped by columns to 'body') that text data needs")]


def test_unknown_layout_lists_columns_and_known_formats(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetInvalid) as caught:
        load_dataset(path)
    message = str(caught.value)
    assert "question, answer" in message
    for name in ("text", "completions", "chat", "alpaca", "sharegpt", "columns", "format"):
        assert name in message
    assert caught.value.error_kind == "dataset_invalid" and caught.value.error_detail["path"] == str(path)


def test_bad_options_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DatasetInvalid, match="unknown field"):
        load_dataset(path, columns={"answer": "a"})
    with pytest.raises(DatasetInvalid, match="unknown format"):
        load_dataset(path, format="openai")
    with pytest.raises(DatasetInvalid, match="unknown file_type"):
        load_dataset(path, file_type="xml")


# ----- strict, lenient, hopeless


def test_strict_names_the_first_ten_rows_lenient_keeps_the_good_ones(tmp_path):
    rows = [{"messages": CHAT}] * 3 + [{"messages": "bad"}] * 12
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    lenient = load_dataset(path)
    assert len(lenient.examples) == 3 and rows_of(lenient.problems) == list(range(4, 16))
    with pytest.raises(DatasetInvalid) as caught:
        load_dataset(path, strict=True)
    detail = caught.value.error_detail
    assert [p["row"] for p in detail["problems"]] == list(range(4, 14))
    assert detail["problems"][0]["reason"] == "messages must be a list of {role, content} objects, got str"
    assert "12 of 15 rows have problems" in str(caught.value) and "row 4:" in str(caught.value)
    assert "and 2 more" in str(caught.value) and "strict" in str(caught.value)


def test_no_good_row_is_always_invalid(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"text": ""}, {"text": 1}])
    with pytest.raises(DatasetInvalid, match="none of its 2 rows") as caught:
        load_dataset(path, strict=False)
    assert [p["row"] for p in caught.value.error_detail["problems"]] == [1, 2]


# ----- splits


def examples(n: int) -> list[Example]:
    return [Example(i + 1, "text", text=str(i)) for i in range(n)]


def test_split_is_deterministic_disjoint_and_keeps_file_order():
    data = examples(100)
    train, val = split_examples(data, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert (train, val) == split_examples(data, 0.1, seed=7)
    assert sorted(e.row for e in train + val) == list(range(1, 101))
    assert [e.row for e in train] == sorted(e.row for e in train) and [e.row for e in val] == sorted(e.row for e in val)
    assert split_examples(data, 0.1, seed=8)[1] != val


def test_split_edges():
    assert split_examples(examples(5), 0.0, seed=1) == (examples(5), [])
    assert [len(part) for part in split_examples(examples(5), 0.01, seed=1)] == [4, 1]  # at least one
    assert [len(part) for part in split_examples(examples(2), 0.9, seed=1)] == [1, 1]  # never all of them
    assert split_examples(examples(1), 0.5, seed=1) == (examples(1), [])
    with pytest.raises(ValueError):
        split_examples(examples(5), 1.0, seed=1)


def test_bundled_demo_dataset_is_clean_chat():
    loaded = load_dataset(DEMO, strict=True)
    assert loaded.format == "chat" and loaded.rows == len(loaded.examples) >= 35 and not loaded.problems
    assert any(e.messages[0]["role"] == "system" for e in loaded.examples)
    assert any(sum(m["role"] == "assistant" for m in e.messages) == 2 for e in loaded.examples)
