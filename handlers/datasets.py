"""datasets/inspect: what a training run would make of a data file, before spending minutes on it.

Runs in a worker process (reading and tokenizing a large file is long work). It reads the file the
way `train` reads it (the helpers here are shared with handlers/train.py), reports the format it
detected, the rows it would skip and why, rendered samples and, with a model, token statistics
computed with that model's own tokenizer and chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from handlers.context import Context
from protocol import messages as m
from protocol.errors import RpcError
from runtimes.train.sft_data import KNOWN_FIELDS, DatasetInvalid, Example, LoadedDataset, Problem, load_dataset

LISTED_PROBLEMS = 100


def dataset_ref(arg: m.DatasetArg) -> m.DatasetRef:
    """A bare string is a path read with every option on auto."""
    return m.DatasetRef(path=arg) if isinstance(arg, str) else arg


def open_dataset(arg: m.DatasetArg, ctx: Context, *, strict: bool, field: str = "params.data") -> LoadedDataset:
    """Check the path against the allowed roots before touching it, then read and validate the file.

    `field` names the params field in errors (params.data, params.validation)."""
    ref = dataset_ref(arg)
    unknown = sorted(set(ref.columns) - set(KNOWN_FIELDS))
    if unknown:
        raise RpcError.invalid_params(f"{field}.columns", f"unknown field(s) {', '.join(map(repr, unknown))}: the keys are our "
                                      f"field names ({', '.join(KNOWN_FIELDS)}), the values the file's column names")
    if not ref.path.strip():
        raise RpcError.invalid_params(f"{field}.path" if not isinstance(arg, str) else field, "give the path of a data file")
    path = ctx.services.paths.check(Path(ref.path).expanduser(), must_exist=True)
    if not path.is_file():  # a FIFO or a device would block the read forever; a directory is no data file
        what = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise RpcError.failed("dataset_invalid", f"{path} is {what}; give a JSONL, JSON, CSV, TSV or Parquet file", path=str(path))
    return load_dataset(path, format=ref.format, file_type=ref.file_type, columns=dict(ref.columns), strict=strict)


SAMPLE_CHARS = 4000  # a sample is for reading; a 40 MB cell must not become a 40 MB answer


def _shown(text: str) -> str:
    if len(text) <= SAMPLE_CHARS:
        return text
    return text[:SAMPLE_CHARS] + f"... [{len(text) - SAMPLE_CHARS} more characters not shown]"


def plain_render(example: Example) -> str:
    """How a row reads without a model's chat template (samples when no model is given)."""
    if example.kind == "text":
        return example.text or ""
    if example.kind == "completion":
        return (example.prompt or "") + (example.completion or "")
    return "\n".join(f"{message['role']}: {message['content']}" for message in example.messages or [])


def inspect(params: m.DatasetsInspectParams, ctx: Context) -> m.DatasetsInspectResult:
    if params.samples < 0:
        raise RpcError.invalid_params("params.samples", "must be 0 or more")
    if params.max_seq_length < 1:
        raise RpcError.invalid_params("params.max_seq_length", "must be at least 1")
    ctx.progress("read", 0, 1, f"reading {dataset_ref(params.data).path}")
    loaded = open_dataset(params.data, ctx, strict=params.strict)
    ctx.progress("read", 1, 1, f"{loaded.rows} rows of {loaded.format} data, {len(loaded.problems)} with problems")
    ctx.check_cancelled({"rows": loaded.rows})

    problems = list(loaded.problems)
    samples: list[m.DatasetSample]
    tokens: m.TokenStats | None = None
    if params.model is None:
        valid_rows = len(loaded.examples)
        samples = [m.DatasetSample(e.row, _shown(plain_render(e)), None, None) for e in loaded.examples[:params.samples]]
    else:
        tokenized, stats, token_problems, samples = _tokenize(params, ctx, loaded)
        problems += token_problems
        valid_rows = len(tokenized)
        tokens = m.TokenStats(**stats)

    problems.sort(key=lambda p: p.row)
    return m.DatasetsInspectResult(
        path=str(loaded.path), file_type=loaded.file_type, format=loaded.format, rows=loaded.rows, valid_rows=valid_rows,
        problem_count=len(problems), problems=[m.DatasetProblem(p.row, p.reason) for p in problems[:LISTED_PROBLEMS]],
        samples=samples, tokens=tokens, sha256=loaded.sha256)


def _tokenize(params: m.DatasetsInspectParams, ctx: Context,
              loaded: LoadedDataset) -> tuple[list[Any], dict[str, Any], list[Problem], list[m.DatasetSample]]:
    """Tokenize with the model's tokenizer only (no weights), as a training run would."""
    from runtimes.train.sft_tokenize import load_tokenizer, render_example, stop_token_ids, token_stats, tokenize_examples

    resolved = ctx.services.models.resolve(params.model, lambda step, total, message: ctx.progress("resolve", step, total, message))
    ctx.check_cancelled({"rows": loaded.rows})
    tokenizer = load_tokenizer(resolved.path)
    total = len(loaded.examples)

    def on_progress(done: int) -> None:
        ctx.check_cancelled({"rows": loaded.rows, "tokenized": done})
        ctx.progress("tokenize", done, total, f"tokenized {done}/{total}")

    tokenized, problems = tokenize_examples(loaded.examples, tokenizer, chat_template=params.chat_template,
                                            max_seq_length=params.max_seq_length, stop_ids=stop_token_ids(tokenizer, resolved.path),
                                            on_progress=on_progress)
    if problems and (params.strict or not tokenized):
        what = (f"{len(problems)} of {total} rows cannot be trained with {params.model} (fix them, or turn strict off to "
                "skip them)") if tokenized else f"none of its {total} usable rows can be trained with {params.model}"
        raise DatasetInvalid.from_problems(loaded.path, problems, what)
    by_row = {example.row: example for example in loaded.examples}
    samples = [m.DatasetSample(t.row, _shown(render_example(by_row[t.row], tokenizer, params.chat_template)), t.n_tokens, t.n_trained)
               for t in tokenized[:params.samples]]
    return tokenized, token_stats(tokenized), problems, samples
