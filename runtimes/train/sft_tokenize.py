"""Examples to token ids with a loss mask, rendered exactly as generation renders them.

A fine-tuned model is only as good as the match between what it was trained on and what it is
later asked: a chat must be rendered with the same template and tokenized the same way as
`generate` does (runtimes/hf/lm.py: the rendered chat is encoded with
add_special_tokens=False, a plain prompt with add_special_tokens=True), or the model learns to
answer prompts it will never see. So the prompt side of every example is encoded the way
generation encodes it, and only the answer side is trained ("completions" loss), unless asked
otherwise.

Masks follow one convention: loss_mask[t] is True when token t is a training target, predicted
from token t-1. Token 0 has nothing before it and is never a target.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel
from runtimes.train.sft_data import Example, Problem

LOSS_ON = ("auto", "completions", "all")
PROGRESS_EVERY = 100


@dataclass
class TokenizedExample:
    row: int
    input_ids: list[int]
    loss_mask: list[bool]  # same length; True where the token is a training target (predicted from the token before it)
    fallback: bool = False  # a chat whose template lacks the prefix property: only its last assistant turn is trained

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)


class NoChatTemplate(Exception):
    error_kind = "no_chat_template"
    retryable = False

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.error_detail = detail


class TemplateMismatch(Exception):
    """The chat template renders a conversation in a way the answer cannot be cut out of."""


# ----- public entry points


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a Hugging Face model directory, without the weights and without remote code."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"cannot load a tokenizer from {path} ({exc}); name a Hugging Face model directory "
                               "with tokenizer files", path=str(path)) from None


def stop_token_ids(tokenizer: Any, model_dir: Path | None = None) -> set[int]:
    """The ids that end an answer, as generation stops on them: the tokenizer's EOS and the model's
    generation_config.json eos_token_id (which for ChatML models is often <|im_end|>)."""
    ids = {end_of_turn_id(tokenizer)}
    config = Path(model_dir) / "generation_config.json" if model_dir else None
    if config is not None and config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
    return ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The EOS appended to text and completion examples, so the model learns to stop."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UnsupportedModel("the tokenizer has no eos_token, so a model trained with it could not learn to stop; set "
                               "eos_token in the model's tokenizer_config.json")
    return int(eos)


def tokenize_examples(examples: Iterable[Example], tokenizer: Any, *, chat_template: str | None = None, loss_on: str = "auto",
                      max_seq_length: int = 2048, stop_ids: Collection[int] | None = None,
                      on_progress: Callable[[int], None] | None = None) -> tuple[list[TokenizedExample], list[Problem]]:
    """Tokenize every example; those that cannot be trained (too long, nothing to learn, a template
    that fails on them) come back as Problems rather than exceptions.

    stop_ids: tokens that end an assistant answer (default: the tokenizer's EOS; pass
    stop_token_ids(tokenizer, model_dir) to match generation). on_progress(done) is called every
    PROGRESS_EVERY examples and may raise to stop (cancellation).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    examples = list(examples)
    eos = end_of_turn_id(tokenizer)
    stops = set(stop_ids) if stop_ids else {eos}
    if any(e.kind == "chat" for e in examples):
        require_chat_template(tokenizer, chat_template)
    done: list[TokenizedExample] = []
    problems: list[Problem] = []
    for index, example in enumerate(examples):
        if on_progress is not None and index and index % PROGRESS_EVERY == 0:
            on_progress(index)
        try:
            tokenized = tokenize_example(example, tokenizer, chat_template=chat_template, loss_on=loss_on, eos=eos, stops=stops)
        except TemplateMismatch as exc:
            problems.append(Problem(example.row, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a template raising on one conversation is that row's problem
            if not _is_template_error(exc):
                raise
            problems.append(Problem(example.row, f"the chat template refused this conversation: {exc}"))
            continue
        if tokenized.n_tokens > max_seq_length:
            problems.append(Problem(example.row, f"{tokenized.n_tokens} tokens, over max_seq_length {max_seq_length}; raise "
                                                 "max_seq_length or shorten it"))
        elif not tokenized.n_trained:
            problems.append(Problem(example.row, "no token of it would be trained (the answer is empty once tokenized)"))
        else:
            done.append(tokenized)
    if on_progress is not None:
        on_progress(len(examples))
    return done, problems


def tokenize_example(example: Example, tokenizer: Any, *, chat_template: str | None = None, loss_on: str = "auto",
                     eos: int | None = None, stops: Collection[int] | None = None) -> TokenizedExample:
    """One example; see tokenize_examples for the rules. Raises TemplateMismatch for a chat whose
    answer cannot be cut out of its rendering."""
    eos = end_of_turn_id(tokenizer) if eos is None else eos
    stops = set(stops) if stops else {eos}
    train_all = loss_on == "all"
    if example.kind == "text":  # nothing is a prompt: every token is learned, whatever loss_on says
        ids = _encode(tokenizer, example.text or "", True) + [eos]
        return _finish(example.row, ids, [True] * len(ids))
    if example.kind == "completion":
        prompt = _encode(tokenizer, example.prompt or "", True)
        completion = _encode(tokenizer, example.completion or "", False) + [eos]
        return _finish(example.row, prompt + completion, [train_all] * len(prompt) + [True] * len(completion))
    pieces, fallback = _chat_pieces(example.messages or [], tokenizer, chat_template)
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_answer in pieces:
        piece = _encode(tokenizer, text, False)
        ids += piece
        mask += _answer_mask(piece, stops) if is_answer else [False] * len(piece)
    if train_all:
        mask = [True] * len(ids)
    return _finish(example.row, ids, mask, fallback)


def render_example(example: Example, tokenizer: Any, chat_template: str | None = None) -> str:
    """The text the model is trained on, as one string (a BOS the tokenizer adds is not shown)."""
    eos = tokenizer.eos_token or ""
    if example.kind == "text":
        return (example.text or "") + eos
    if example.kind == "completion":
        return (example.prompt or "") + (example.completion or "") + eos
    require_chat_template(tokenizer, chat_template)
    return _render(tokenizer, example.messages or [], chat_template, False)


def token_stats(tokenized: list[TokenizedExample]) -> dict[str, Any]:
    """Length statistics over n_tokens (p95 by nearest rank), with the totals a run will process."""
    lengths = sorted(t.n_tokens for t in tokenized)
    if not lengths:
        return {"min": 0, "max": 0, "mean": 0.0, "median": 0.0, "p95": 0, "total": 0, "trained_tokens": 0}
    return {
        "min": lengths[0],
        "max": lengths[-1],
        "mean": round(sum(lengths) / len(lengths), 2),
        "median": float(statistics.median(lengths)),
        "p95": lengths[max(0, math.ceil(0.95 * len(lengths)) - 1)],
        "total": sum(lengths),
        "trained_tokens": sum(t.n_trained for t in tokenized),
    }


def require_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise NoChatTemplate(f"{name} has no chat template and the data has conversations: pass chat_template (a Jinja "
                             "template, the same one you will generate with), or use text or prompt/completion data",
                             model=str(name))


# ----- chat


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str | None, add_generation_prompt: bool) -> str:
    """Exactly TransformersModel.render_chat, so training sees what generation will send."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _chat_pieces(messages: list[dict[str, str]], tokenizer: Any, template: str | None) -> tuple[list[tuple[str, bool]], bool]:
    """The conversation as (text, is_answer) pieces, up to the end of its last assistant answer.

    Every assistant turn is an answer when the template has the prefix property (each prompt
    rendering extends the previous turn's, and the whole rendering extends each turn's);
    otherwise only the last assistant turn is, with the turns after it left out."""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    full = _render(tokenizer, messages, template, False)
    pieces: list[tuple[str, bool]] = []
    done = ""  # the rendering covered by the pieces so far
    for i in answers:
        prefix = _render(tokenizer, messages[:i], template, True)
        through = _render(tokenizer, messages[:i + 1], template, False)
        if not (prefix.startswith(done) and through.startswith(prefix) and full.startswith(through)):
            return _last_turn_pieces(messages, answers[-1], tokenizer, template), True
        pieces += [(prefix[len(done):], False), (through[len(prefix):], True)]
        done = through
    return [(text, is_answer) for text, is_answer in pieces if text], False


def _last_turn_pieces(messages: list[dict[str, str]], last: int, tokenizer: Any, template: str | None) -> list[tuple[str, bool]]:
    prefix = _render(tokenizer, messages[:last], template, True)
    through = _render(tokenizer, messages[:last + 1], template, False)
    if not through.startswith(prefix):
        raise TemplateMismatch("the chat template does not render this conversation as its prompt followed by the answer, "
                               "so the answer cannot be told apart; use a chat_template whose prompt rendering "
                               "(add_generation_prompt) is a prefix of the rendering with the answer")
    return [(text, is_answer) for text, is_answer in ((prefix, False), (through[len(prefix):], True)) if text]


def _answer_mask(piece: list[int], stops: Collection[int]) -> list[bool]:
    """Train up to and including the first stop token, so the model learns to end its turn; what
    the template puts after it (a newline) is not the model's to say. An answer rendered without
    any stop token is trained whole: nothing is appended, the template decides how turns end."""
    for position, token in enumerate(piece):
        if token in stops:
            return [True] * (position + 1) + [False] * (len(piece) - position - 1)
    return [True] * len(piece)


# ----- helpers


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _is_template_error(exc: Exception) -> bool:
    """jinja2's TemplateError (raise_exception() in a template, a syntax error), without importing jinja2 early."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return False
    return isinstance(exc, TemplateError)


def _finish(row: int, ids: list[int], mask: list[bool], fallback: bool = False) -> TokenizedExample:
    if mask:
        mask[0] = False  # nothing comes before the first token to predict it from
    return TokenizedExample(row, ids, mask, fallback)
