"""Token ids and loss masks for training, with builtin:tiny's tokenizer (ChatML template, EOS
<|endoftext|>, end of turn <|im_end|>): what is trained, what is not, and that the prompt side is
exactly what generation encodes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from runtimes.train.sft_data import Example, Problem
from runtimes.train.sft_tokenize import (
    NoChatTemplate,
    TokenizedExample,
    end_of_turn_id,
    load_tokenizer,
    render_example,
    stop_token_ids,
    token_stats,
    tokenize_example,
    tokenize_examples,
)
from runtimes.tiny import CHAT_TEMPLATE
from runtimes.hf.lm import TransformersModel

TWO_TURNS = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you soon."},
]
# Renders earlier assistant turns differently from the last one (as templates that drop old
# reasoning do), so a conversation's rendering does not extend its turns' renderings.
REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n(earlier)<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The generation prompt is never followed by the answer: the answer cannot be cut out.
DETACHED_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\\n' }}{% endif %}", "<|im_start|>assistant\\nthinking\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def stops(tok, tiny_path):
    return stop_token_ids(tok, tiny_path)


@pytest.fixture(scope="module")
def generation(tok, tiny_path):
    """Generation's own rendering and encoding (TransformersModel.render_chat/encode) on this tokenizer."""
    face = SimpleNamespace(tokenizer=tok, path=tiny_path)

    def prompt_ids(messages=None, prompt=None, template=None):
        if messages is not None:
            text = TransformersModel.render_chat(face, messages, template, True)
            return TransformersModel.encode(face, text, chat=True)
        return TransformersModel.encode(face, prompt)

    return prompt_ids


def chat(messages, row=1):
    return Example(row, "chat", messages=messages)


def trained_spans(tok, t: TokenizedExample) -> list[str]:
    """The decoded runs of trained tokens."""
    spans, current = [], []
    for token, trained in zip(t.input_ids, t.loss_mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(tok.decode(current)); current = []
    if current:
        spans.append(tok.decode(current))
    return spans


def test_stop_ids_are_eos_and_generation_configs_end_of_turn(tok, stops):
    assert end_of_turn_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert stops == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


def test_text_is_trained_whole_and_learns_eos(tok):
    t = tokenize_example(Example(1, "text", text="The fox ran."), tok)
    assert t.input_ids == tok.encode("The fox ran.", add_special_tokens=True) + [tok.eos_token_id]
    assert t.loss_mask == [False] + [True] * (t.n_tokens - 1)  # the first token has nothing to be predicted from
    assert t.n_trained == t.n_tokens - 1 and t.input_ids[-1] == tok.eos_token_id and t.loss_mask[-1]


def test_completion_trains_only_the_completion_and_eos(tok, generation):
    t = tokenize_example(Example(3, "completion", prompt="Once upon a time", completion=" a fox slept."), tok)
    prompt = generation(prompt="Once upon a time")
    assert t.input_ids[:len(prompt)] == prompt  # the prompt exactly as generate encodes a plain prompt
    completion = tok.encode(" a fox slept.", add_special_tokens=False) + [tok.eos_token_id]
    assert t.input_ids[len(prompt):] == completion
    assert t.loss_mask == [False] * len(prompt) + [True] * len(completion)
    everything = tokenize_example(Example(3, "completion", prompt="Once upon a time", completion=" a fox slept."), tok, loss_on="all")
    assert everything.input_ids == t.input_ids and everything.loss_mask == [False] + [True] * (t.n_tokens - 1)


def test_chat_prompt_prefix_is_what_generation_encodes(tok, stops, generation):
    t = tokenize_example(chat(TWO_TURNS), tok, stops=stops)
    first_trained = t.loss_mask.index(True)
    # prefix_0, encoded whole, is the prompt generation sends for the first answer ...
    assert t.input_ids[:first_trained] == generation(messages=TWO_TURNS[:2])
    # ... and every later prompt too: the ids before each answer equal generation's for that turn.
    second = generation(messages=TWO_TURNS[:4])
    assert t.input_ids[:len(second)] == second and t.loss_mask[len(second)] and not t.loss_mask[len(second) - 1]
    # With ChatML the pieces even join into the encoding of the whole rendering.
    assert t.input_ids == tok.encode(tok.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False)
    assert not t.fallback


def test_chat_mask_trains_each_answer_through_its_end_of_turn_not_the_newline(tok, stops):
    t = tokenize_example(chat(TWO_TURNS), tok, stops=stops)
    assert trained_spans(tok, t) == ["Hello there!<|im_end|>", "See you soon.<|im_end|>"]
    assert tok.decode(t.input_ids[-1:]) == "\n" and not t.loss_mask[-1]
    everything = tokenize_example(chat(TWO_TURNS), tok, loss_on="all", stops=stops)
    assert everything.input_ids == t.input_ids and everything.n_trained == t.n_tokens - 1


def test_answer_without_a_stop_token_is_trained_whole_and_nothing_is_appended(tok):
    """With only <|endoftext|> as stop id, a ChatML answer holds no stop token: its whole segment
    (the newline included) is trained, and no EOS is added to the conversation."""
    t = tokenize_example(chat(TWO_TURNS[1:3]), tok)
    assert trained_spans(tok, t) == ["Hello there!<|im_end|>\n"]
    assert tok.eos_token_id not in t.input_ids


def test_turns_after_the_last_answer_are_left_out(tok, stops):
    t = tokenize_example(chat(TWO_TURNS[:4]), tok, stops=stops)
    assert tok.decode(t.input_ids).endswith("Hello there!<|im_end|>\n")


def test_template_without_the_prefix_property_trains_only_the_last_turn(tok, stops, generation):
    t = tokenize_example(chat(TWO_TURNS), tok, chat_template=REWRITING_TEMPLATE, stops=stops)
    assert t.fallback
    assert trained_spans(tok, t) == ["See you soon.<|im_end|>"]
    prompt = generation(messages=TWO_TURNS[:4], template=REWRITING_TEMPLATE)
    assert t.input_ids[:len(prompt)] == prompt and t.loss_mask.index(True) == len(prompt)
    assert "(earlier)" in tok.decode(prompt)


def test_unusable_template_and_template_errors_are_row_problems(tok, stops):
    done, problems = tokenize_examples([chat(TWO_TURNS[1:3], row=4)], tok, chat_template=DETACHED_TEMPLATE, stop_ids=stops)
    assert done == [] and problems[0].row == 4 and "cannot be told apart" in problems[0].reason
    raising = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn is required') }}{% endif %}" + CHAT_TEMPLATE
    done, problems = tokenize_examples([chat(TWO_TURNS, row=1), chat(TWO_TURNS[1:3], row=2)], tok, chat_template=raising,
                                       stop_ids=stops)
    assert [t.row for t in done] == [1]
    assert problems == [Problem(2, "the chat template refused this conversation: a system turn is required")]


def test_over_length_and_untrained_rows_are_problems(tok, stops):
    long_text = "The quick brown fox jumps over the lazy dog. " * 20
    examples = [Example(12, "text", text=long_text), Example(13, "text", text="short"), chat(TWO_TURNS, row=14)]
    done, problems = tokenize_examples(examples, tok, max_seq_length=64, stop_ids=stops)
    length = len(tok.encode(long_text)) + 1
    assert [t.row for t in done] == [13, 14]
    assert problems == [Problem(12, f"{length} tokens, over max_seq_length 64; raise max_seq_length or shorten it")]
    done, problems = tokenize_examples([Example(5, "text", text="")], tok)  # only the EOS, which nothing predicts
    assert done == [] and problems[0].row == 5 and "no token" in problems[0].reason


def test_no_chat_template_is_an_error_unless_one_is_passed(tiny_path, stops):
    bare = load_tokenizer(tiny_path)
    bare.chat_template = None
    with pytest.raises(NoChatTemplate, match="pass chat_template") as caught:
        tokenize_examples([chat(TWO_TURNS)], bare)
    assert caught.value.error_kind == "no_chat_template"
    done, _ = tokenize_examples([chat(TWO_TURNS)], bare, chat_template=CHAT_TEMPLATE, stop_ids=stops)
    assert len(done) == 1
    assert tokenize_examples([Example(1, "text", text="plain text needs no template")], bare)[0]


def test_render_example(tok):
    assert render_example(chat(TWO_TURNS), tok) == tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert render_example(Example(1, "completion", prompt="Q: ", completion="A"), tok) == "Q: A<|endoftext|>"
    assert render_example(Example(1, "text", text="hello"), tok) == "hello<|endoftext|>"


def test_progress_callback_can_stop_the_loop(tok):
    seen = []

    def on_progress(done):
        seen.append(done)
        if done >= 200:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_examples([Example(i, "text", text="a fox") for i in range(1, 500)], tok, on_progress=on_progress)
    assert seen == [100, 200]
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_examples([], tok, loss_on="prompts")


def test_token_stats():
    def fake(n, trained):
        return TokenizedExample(1, [0] * n, [True] * trained + [False] * (n - trained))

    stats = token_stats([fake(n, 2) for n in (10, 20, 30, 40)] + [fake(100, 5)])
    assert stats == {"min": 10, "max": 100, "mean": 40.0, "median": 30.0, "p95": 100, "total": 200, "trained_tokens": 13}
    stats = token_stats([fake(n, 1) for n in range(1, 21)])
    assert stats["p95"] == 19 and stats["median"] == 10.5
    assert token_stats([])["total"] == 0
