"""Reading and validating the data files a user fine-tunes on.

Users bring data in whatever shape their last tool wanted: JSONL, JSON, CSV, TSV or Parquet, in
plain-text, prompt/completion, OpenAI chat, Alpaca or ShareGPT layout. This module turns every one
of them into a list of `Example`s of three kinds (text, completion, chat) and a list of `Problem`s
that name the record and say what is wrong with it, so a bad row costs the user one line to fix
instead of a failed training run. Nothing here knows about tokenizers or the wire.

Row numbers are 1-based record numbers in the file: the JSONL line number (blank lines counted),
the JSON array index + 1, or the CSV/TSV/Parquet data row with the header excluded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FILE_TYPES = ("jsonl", "json", "csv", "tsv", "parquet")
FORMATS = ("text", "completions", "chat", "alpaca", "sharegpt")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
              ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}
# The fields each format reads, in the order detection prefers them when a record has several.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completions": ("prompt", "completion"),
    "text": ("text",),
}
KNOWN_FIELDS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "system", "conversations")
DETECT_ROWS = 100
MAX_LISTED = 10  # problems named in a DatasetInvalid error

Row = dict[str, Any]


class DatasetInvalid(Exception):
    """The file cannot be used as asked; maps to the protocol's dataset_invalid failure."""

    error_kind = "dataset_invalid"
    retryable = False

    def __init__(self, message: str, path: Path | str, problems: Iterable[Problem] = ()) -> None:
        super().__init__(message)
        listed = list(problems)[:MAX_LISTED]
        self.error_detail = {"path": str(path), "problems": [{"row": p.row, "reason": p.reason} for p in listed]}

    @classmethod
    def from_problems(cls, path: Path | str, problems: list[Problem], what: str) -> DatasetInvalid:
        """`what` opens the message ("3 of 40 rows have problems"); the first rows and a way out follow."""
        shown = "; ".join(f"row {p.row}: {p.reason}" for p in problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        return cls(f"{path}: {what}: {shown}{more}", path, problems)


@dataclass(frozen=True)
class Problem:
    row: int
    reason: str


@dataclass
class Example:
    row: int
    kind: Literal["text", "completion", "chat"]
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None  # [{"role": "system"|"user"|"assistant", "content": str}]


@dataclass
class LoadedDataset:
    path: Path
    file_type: str
    format: str
    rows: int
    examples: list[Example]
    problems: list[Problem]
    sha256: str  # of the file's bytes: what a training manifest records as its input


class RowError(Exception):
    """One record's problem, raised while converting it and turned into a Problem."""


# ----- public entry points


def load_dataset(path: Path, *, format: str = "auto", file_type: str = "auto", columns: dict[str, str] | None = None,
                 strict: bool = False) -> LoadedDataset:
    """Read, detect and validate a dataset file.

    strict=False returns the good examples with the problems (the caller reports them);
    strict=True raises DatasetInvalid naming the first bad rows. A file with no good row is always
    DatasetInvalid; a missing file is FileNotFoundError.
    """
    path = Path(path)
    columns = dict(columns or {})
    _check_options(path, format, file_type, columns)
    if path.is_dir():
        raise DatasetInvalid(f"{path} is a directory; pass the data file itself (.jsonl, .json, .csv, .tsv or .parquet)", path)
    data = path.read_bytes()  # FileNotFoundError passes through as it is
    digest = hashlib.sha256(data).hexdigest()
    kind = file_type if file_type != "auto" else _guess_file_type(path, data)
    kind, records = _read_records(path, data, kind, sniffed=file_type == "auto" and path.suffix.lower() not in EXTENSIONS)
    tabular = kind in ("csv", "tsv", "parquet")
    rows = len(records)
    if not rows:
        raise DatasetInvalid(f"{path} has no rows; add some data (one record per line for .jsonl)", path)
    chosen = format if format != "auto" else _detect_format(path, records, columns)

    examples: list[Example] = []
    problems: list[Problem] = []
    for row, record in records:
        if isinstance(record, Problem):
            problems.append(record)
            continue
        try:
            examples.append(_convert(row, record, chosen, columns, tabular))
        except RowError as exc:
            problems.append(Problem(row, str(exc)))
    problems.sort(key=lambda p: p.row)
    if not examples:
        raise DatasetInvalid.from_problems(path, problems, f"none of its {rows} rows can be used as {chosen} data "
                                           "(fix the rows, or set format/columns if it was read the wrong way)")
    if strict and problems:
        raise DatasetInvalid.from_problems(path, problems, f"{len(problems)} of {rows} rows have problems "
                                           "(fix them, or turn strict off to skip them)")
    return LoadedDataset(path, kind, chosen, rows, examples, problems, digest)


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a validation set: a seeded shuffle, then the last round(fraction*n) examples (at least
    one when fraction > 0 and n >= 2, and never all of them). Both parts keep the file's order, so
    the same data, fraction and seed always give the same split."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be at least 0 and below 1, got {fraction}")
    n = len(examples)
    count = round(fraction * n)
    if fraction > 0 and n >= 2:
        count = min(max(count, 1), n - 1)
    if count <= 0:
        return list(examples), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[n - count:])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# ----- options


def _check_options(path: Path, format: str, file_type: str, columns: dict[str, str]) -> None:
    if format != "auto" and format not in FORMATS:
        raise DatasetInvalid(f"unknown format {format!r}; use one of auto, {', '.join(FORMATS)}", path)
    if file_type != "auto" and file_type not in FILE_TYPES:
        raise DatasetInvalid(f"unknown file_type {file_type!r}; use one of auto, {', '.join(FILE_TYPES)}", path)
    unknown = sorted(set(columns) - set(KNOWN_FIELDS))
    if unknown:
        raise DatasetInvalid(f"columns maps unknown field(s) {', '.join(map(repr, unknown))}; the keys of columns are our field "
                             f"names ({', '.join(KNOWN_FIELDS)}) and the values the file's column names", path)


# ----- file types


def _guess_file_type(path: Path, data: bytes) -> str:
    """The extension decides; an unknown one falls back to the first bytes."""
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind:
        return kind
    if data.startswith(b"PAR1"):
        return "parquet"
    first = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        return "jsonl"
    raise DatasetInvalid(f"cannot tell what kind of file {path} is from its extension {path.suffix or '(none)'!r} or its "
                         "first bytes; name it .jsonl, .json, .csv, .tsv or .parquet, or pass file_type", path)


def _read_records(path: Path, data: bytes, kind: str, sniffed: bool) -> tuple[str, list[tuple[int, Row | Problem]]]:
    """The file type really read and its (row, record) pairs; a record that is not an object comes
    back as its Problem."""
    if kind == "parquet":
        return kind, _read_parquet(path, data)
    text = _decode(path, data)
    if kind == "jsonl":
        records = _read_jsonl(text)
        if sniffed and all(isinstance(r, Problem) for _, r in records):  # a pretty-printed JSON object, not JSON Lines
            whole = _try_json(text)
            if whole is not None:
                return "json", _read_json(path, whole)
        return kind, records
    if kind == "json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            records = _read_jsonl(text)  # JSON Lines saved as .json is common enough to just read
            if any(not isinstance(r, Problem) for _, r in records):
                return "jsonl", records
            raise DatasetInvalid(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                                 "fix it, or save one JSON object per line as .jsonl", path) from None
        return kind, _read_json(path, whole)
    return kind, _read_delimited(path, text, "\t" if kind == "tsv" else ",")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(f"{path} is not UTF-8 text (byte {exc.start} is not valid UTF-8); save it as UTF-8", path) from None


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _read_jsonl(text: str) -> list[tuple[int, Row | Problem]]:
    records: list[tuple[int, Row | Problem]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append((number, Problem(number, f"not valid JSON (column {exc.colno}: {exc.msg}); each line must be "
                                                    "one JSON object")))
            continue
        records.append((number, value if isinstance(value, dict) else Problem(number, _not_object(value))))
    return records


def _read_json(path: Path, value: Any) -> list[tuple[int, Row | Problem]]:
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list) and key not in KNOWN_FIELDS]
        if not lists and _record_format(value, {}):
            return [(1, value)]  # a file holding a single row
        if len(lists) != 1:
            found = f"several lists ({', '.join(lists)})" if lists else "no list of rows"
            raise DatasetInvalid(f"{path} holds one JSON object with {found}; put the rows in a top-level array, or in an "
                                 "object with one list such as {\"data\": [...]}", path)
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DatasetInvalid(f"{path} holds a JSON {_json_type(value)}; it must hold an array of row objects", path)
    return [(i + 1, item if isinstance(item, dict) else Problem(i + 1, _not_object(item))) for i, item in enumerate(value)]


def _read_delimited(path: Path, text: str, delimiter: str) -> list[tuple[int, Row | Problem]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # whole conversations fit in one cell
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[tuple[int, Row | Problem]] = []
    try:
        if not reader.fieldnames:
            return []
        for number, record in enumerate(reader, start=1):
            if None in record:
                extra = len(record[None])  # type: ignore[index]
                records.append((number, Problem(number, f"has {extra} more cell(s) than the header "
                                                        f"({len(reader.fieldnames)} columns); quote cells that contain "
                                                        f"{'tabs' if delimiter == chr(9) else 'commas'}")))
                continue
            records.append((number, {k: v for k, v in record.items() if v is not None}))
    except csv.Error as exc:
        raise DatasetInvalid(f"{path} cannot be read as {'TSV' if delimiter == chr(9) else 'CSV'} near data row "
                             f"{len(records) + 1}: {exc}; check its quoting", path) from None
    return records


def _read_parquet(path: Path, data: bytes) -> list[tuple[int, Row | Problem]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetInvalid("reading Parquet needs pyarrow: pip install pyarrow, or save the data as .jsonl", path) from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"{path} cannot be read as Parquet ({exc}); check the file, or pass file_type", path) from None
    return [(i + 1, record) for i, record in enumerate(table.to_pylist())]


# ----- formats


def _field(record: Row, name: str, columns: dict[str, str]) -> Any:
    return record.get(columns.get(name, name))


def _has(record: Row, name: str, columns: dict[str, str]) -> bool:
    return columns.get(name, name) in record


def _record_format(record: Row, columns: dict[str, str]) -> str | None:
    for name, fields in FORMAT_FIELDS.items():
        if all(_has(record, f, columns) for f in fields):
            return name
    return None


def _detect_format(path: Path, records: list[tuple[int, Row | Problem]], columns: dict[str, str]) -> str:
    """The format most of the first rows have; ties go to the richer format (FORMAT_FIELDS' order)."""
    votes: Counter[str] = Counter()
    seen: dict[str, None] = {}
    for _, record in records[:DETECT_ROWS]:
        if isinstance(record, Problem):
            continue
        seen.update(dict.fromkeys(record))
        found = _record_format(record, columns)
        if found:
            votes[found] += 1
    if votes:
        order = list(FORMAT_FIELDS)
        return max(votes, key=lambda name: (votes[name], -order.index(name)))
    shown = ", ".join(list(seen)[:20]) + (" ..." if len(seen) > 20 else "") if seen else "none (no row is an object)"
    known = "; ".join(f"{name}: {' + '.join(fields)}" for name, fields in FORMAT_FIELDS.items())
    raise DatasetInvalid(f"cannot tell the format of {path}: its columns are {shown}; the formats known are {known} "
                         "(alpaca may add input and system). Rename the columns, map them with columns (for example "
                         "{\"prompt\": \"question\", \"completion\": \"answer\"}), or pass format", path)


def _convert(row: int, record: Row, format: str, columns: dict[str, str], tabular: bool) -> Example:
    def need(name: str) -> Any:
        if not _has(record, name, columns):
            mapped = f" (mapped by columns to {columns[name]!r})" if name in columns else ""
            raise RowError(f"missing field {name!r}{mapped} that {format} data needs")
        return _field(record, name, columns)

    if format == "text":
        return Example(row, "text", text=_string(need("text"), "text"))
    if format == "completions":
        prompt, completion = need("prompt"), need("completion")
        if tabular:
            prompt, completion = _json_list(prompt), _json_list(completion)
        if isinstance(prompt, list):  # TRL's conversational prompt/completion: both lists of messages
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            return _chat(row, _messages(prompt, "prompt") + _messages(completion, "completion"))
        return Example(row, "completion", prompt=_string(prompt, "prompt"), completion=_string(completion, "completion"))
    if format == "chat":
        return _chat(row, _messages(_parse_list(need("messages"), "messages", tabular), "messages"))
    if format == "alpaca":
        instruction = _string(need("instruction"), "instruction")
        output = _string(need("output"), "output")
        extra = _optional_string(_field(record, "input", columns), "input")
        system = _optional_string(_field(record, "system", columns), "system")
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
                     {"role": "assistant", "content": output}]
        return Example(row, "chat", messages=messages)
    if format == "sharegpt":
        return _chat(row, _sharegpt(_parse_list(need("conversations"), "conversations", tabular)))
    raise RowError(f"unknown format {format!r}")


def _chat(row: int, messages: list[dict[str, str]]) -> Example:
    for index, message in enumerate(messages):
        if message["role"] == "system" and index:
            raise RowError(f"message {index + 1} is a system turn; a system turn may only come first")
    if not any(message["role"] == "assistant" for message in messages):
        raise RowError("the conversation has no assistant turn, so there is nothing to learn from it")
    return Example(row, "chat", messages=messages)


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(f"{name} must be a list of {{role, content}} objects, got {_json_type(value)}")
    if not value:
        raise RowError(f"{name} is an empty list; a conversation needs at least a user and an assistant turn")
    messages = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise RowError(f"{name} must be a list of {{role, content}} objects; item {index} is {_json_type(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise RowError(f"message {index} of {name} has no role (a string: {', '.join(ROLES)})")
        if role not in ROLES:
            hint = " (ShareGPT rows use conversations with from/value: pass format sharegpt)" if role in SHAREGPT_ROLES else ""
            raise RowError(f"message {index} of {name} has unknown role {role!r}; allowed roles are {', '.join(ROLES)}{hint}")
        if not isinstance(content, str):
            raise RowError(f"message {index} ({role}) of {name}: content must be a string, got {_json_type(content)}")
        if not content.strip():
            raise RowError(f"message {index} ({role}) of {name} has empty content")
        messages.append({"role": role, "content": content})
    return messages


def _sharegpt(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RowError(f"conversations must be a list of {{from, value}} objects, got {_json_type(value)}")
    if not value:
        raise RowError("conversations is an empty list; a conversation needs at least a human and a gpt turn")
    messages = []
    for index, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            raise RowError(f"conversations must be a list of {{from, value}} objects; item {index} is {_json_type(turn)}")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or speaker.lower() not in SHAREGPT_ROLES:
            raise RowError(f"turn {index} of conversations has unknown from {speaker!r}; allowed are "
                           f"{', '.join(SHAREGPT_ROLES)}")
        role = SHAREGPT_ROLES[speaker.lower()]
        if not isinstance(content, str):
            raise RowError(f"turn {index} ({speaker}) of conversations: value must be a string, got {_json_type(content)}")
        if not content.strip():
            raise RowError(f"turn {index} ({speaker}) of conversations has an empty value")
        messages.append({"role": role, "content": content})
    return messages


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{name} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RowError(f"{name} is empty")
    return value


def _optional_string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"{name} must be a string when given, got {_json_type(value)}")
    return value if value.strip() else ""


def _json_list(value: Any) -> Any:
    """A cell's text parsed when it is a JSON list of objects (a conversation), else the value unchanged:
    a prompt such as "[INST] hi" stays a string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        parsed = _try_json(value)
        if isinstance(parsed, list) and parsed and all(isinstance(item, dict) for item in parsed):
            return parsed
    return value


def _parse_list(value: Any, name: str, tabular: bool) -> Any:
    """A CSV/TSV/Parquet cell holds a conversation as JSON text; JSON files must hold the list itself."""
    if not (tabular and isinstance(value, str)):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(f"{name} cell is not valid JSON (column {exc.colno}: {exc.msg}); write it as a JSON list of "
                       "{role, content} objects") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "str", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)


def _not_object(value: Any) -> str:
    return f"must be a JSON object with the row's fields, got {_json_type(value)}"

