"""The Ollama Modelfile: each family's Jinja chat template, translated to a Go template, must render
the same prompt text as the Jinja template itself.

The Jinja templates below are written out as the model families publish them in their
tokenizer_config.json (short public chat templates). The Go templates are rendered by a small
interpreter of the Go text/template subset Ollama's templates use, written here independently of
the translator, with Ollama's data model: `.Messages` holds every message (system ones included),
`.System` the system messages' text joined by blank lines; a Modelfile SYSTEM becomes a leading
system message when the request has none. llama.cpp adds BOS itself when the GGUF says so, so for
those families the Jinja output is compared without its leading BOS token.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from runtimes.gguf.modelfile import GgufChat, Untranslatable, analyze, build_modelfile, go_template, stop_tokens
from runtimes.tiny import CHAT_TEMPLATE as TINY

# ---------------------------------------------------------------------------------------------
# The families' published Jinja chat templates

CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
    "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# family -> (template, bos_token, eos_token, add_bos, control tokens, expected family, system placement, stops)
FAMILIES: dict[str, tuple[Any, ...]] = {
    "builtin-tiny": (TINY, "<|endoftext|>", "<|endoftext|>", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     "chatml", "turn", ["<|im_end|>", "<|endoftext|>"]),
    "qwen2-chatml": (CHATML_QWEN2, "", "<|im_end|>", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     "chatml", "turn", ["<|im_end|>"]),
    "qwen2.5": (QWEN25, "", "<|im_end|>", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "chatml", "turn", ["<|im_end|>"]),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True,
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "llama3", "turn", ["<|eot_id|>"]),
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", True,
                 ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "llama3", "turn", ["<|eot_id|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", True, ["<unk>", "<s>", "</s>"], "mistral", "none", ["</s>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", True, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "gemma", "none", ["<end_of_turn>", "<eos>"]),
    "gemma3": (GEMMA3, "<bos>", "<eos>", True, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
               "gemma", "first_user", ["<end_of_turn>", "<eos>"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", False, ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
             "phi3", "turn", ["<|end|>", "<|endoftext|>"]),
}

TWO_TURNS = [{"role": "user", "content": "What is a fox?"}, {"role": "assistant", "content": "A small wild canine."},
             {"role": "user", "content": "And a crow?"}]
SYSTEM = {"role": "system", "content": "You answer in one sentence."}


# ---------------------------------------------------------------------------------------------
# A Go text/template subset: text, {{ .Field }}, {{ $.Field }}, {{ $var }}, "strings", numbers,
# if / else if / else / end, range [$i, $m :=] PIPE, and, or, not, eq, (parentheses), {{- and -}}.


def _lex(template: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in re.finditer(r"\{\{(-\s)?(.*?)(\s-)?\}\}", template, re.S):
        text = template[pos:match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim_next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2).strip()))
        if match.group(3):
            tokens.append(("trim_next", ""))
        pos = match.end()
    rest = template[pos:]
    if tokens and tokens[-1][0] == "trim_next":
        tokens.pop()
        rest = rest.lstrip()
    tokens.append(("text", rest))
    return tokens


def _parse(tokens: list[tuple[str, str]], pos: int = 0, stop: tuple[str, ...] = ()) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while pos < len(tokens):
        kind, value = tokens[pos]
        if kind == "text":
            nodes.append(("text", value))
            pos += 1
            continue
        word = value.split(" ", 1)[0]
        if word in stop:
            return nodes, pos
        if word == "if":
            branches, pos = [], pos
            condition = value[2:].strip()
            while True:
                body, pos = _parse(tokens, pos + 1, ("else", "end"))
                branches.append((condition, body))
                _, closing = tokens[pos]
                if closing == "end":
                    break
                condition = closing[len("else if"):].strip() if closing.startswith("else if") else None
            nodes.append(("if", branches))
            pos += 1
        elif word == "range":
            header = value[len("range"):].strip()
            names: list[str] = []
            if ":=" in header:
                left, header = header.split(":=")
                names = [n.strip() for n in left.split(",")]
            body, pos = _parse(tokens, pos + 1, ("end",))
            nodes.append(("range", names, header.strip(), body))
            pos += 1
        else:
            nodes.append(("print", value))
            pos += 1
    return nodes, pos


def _args(text: str) -> list[str]:
    out, depth, current, quoted = [], 0, "", False
    for ch in text:
        if ch == '"' and depth == 0:
            quoted = not quoted
        if ch == " " and depth == 0 and not quoted:
            if current:
                out.append(current)
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0) if not quoted else 0
        current += ch
    return out + ([current] if current else [])


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def _eval(expr: str, dot: Any, root: Any, variables: dict[str, Any]) -> Any:
    parts = _args(expr)
    if len(parts) > 1:
        name, args = parts[0], [_eval(a, dot, root, variables) for a in parts[1:]]
        functions = {"eq": lambda a, b: a == b, "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
                     "or": lambda *a: next((x for x in a if _truth(x)), a[-1]), "not": lambda a: not _truth(a)}
        return functions[name](*args)
    atom = parts[0]
    if atom.startswith("("):
        return _eval(atom[1:-1], dot, root, variables)
    if atom.startswith('"'):
        return atom[1:-1].replace('\\"', '"').replace("\\n", "\n")
    if atom.isdigit():
        return int(atom)
    if atom.startswith("$."):
        return root.get(atom[2:])
    if atom.startswith("$"):
        return variables[atom]
    if atom.startswith("."):
        return dot.get(atom[1:]) if isinstance(dot, dict) else None
    raise ValueError(f"unsupported Go template atom {atom!r}")


def _run(nodes: list[Any], dot: Any, root: Any, variables: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(_eval(node[1], dot, root, variables)))
        elif node[0] == "if":
            for condition, body in node[1]:
                if condition is None or _truth(_eval(condition, dot, root, variables)):
                    _run(body, dot, root, variables, out)
                    break
        elif node[0] == "range":
            _, names, expr, body = node
            for index, item in enumerate(_eval(expr, dot, root, variables) or []):
                scope = dict(variables)
                if len(names) == 2:
                    scope[names[0]], scope[names[1]] = index, item
                elif names:
                    scope[names[0]] = item
                _run(body, item, root, scope, out)


def render_go(template: str, messages: list[dict[str, str]], modelfile_system: str | None = None) -> str:
    """Render as Ollama does: a Modelfile SYSTEM leads when the request has no system message."""
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": modelfile_system}] + messages
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system")}
    nodes, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, root, root, {"$": root}, out)
    return "".join(out)


def render_jinja(template: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def test_go_renderer_knows_the_subset() -> None:
    """The interpreter itself, on a template that uses every construct (so a broken renderer cannot pass)."""
    template = ('{{- if .System }}S={{ .System }};{{ else }}none;{{ end -}}\n  {{ range $i, $m := .Messages }}'
                '{{ if and $.System (eq $i 1) }}first:{{ end }}{{ if eq .Role "user" }}U[{{ .Content }}]'
                '{{ else if eq .Role "assistant" }}A[{{ .Content }}]{{ else }}({{ .Role }}){{ end }}{{ end }}'
                '{{ if not .System }}!{{ end }}')
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert render_go(template, messages) == "S=s;(system)first:U[u]A[a]"
    assert render_go(template, messages[1:]) == "none;U[u]A[a]!"


# ---------------------------------------------------------------------------------------------
# The families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_go_template_renders_like_the_jinja_template(family: str) -> None:
    template, bos, eos, add_bos, _, expected_family, placement, _ = FAMILIES[family]
    fmt = analyze(template, bos_token=bos, eos_token=eos, add_bos=add_bos)
    assert (fmt.family, fmt.system) == (expected_family, placement)
    go = go_template(fmt)
    conversations = [TWO_TURNS, TWO_TURNS[:1], TWO_TURNS + [{"role": "assistant", "content": "A bird."},
                                                            {"role": "user", "content": "Which is faster?"}]]
    if placement != "none":  # these families' templates refuse or drop a system message
        conversations += [[SYSTEM] + c for c in conversations]
    for messages in conversations:
        jinja = render_jinja(template, messages, bos, eos)
        if add_bos:  # llama.cpp's tokenizer adds BOS for these; Ollama's template must not
            assert jinja.startswith(bos)
            jinja = jinja[len(bos):]
        assert render_go(go, messages) == jinja, (family, messages)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_modelfile_template_stops_and_system(family: str) -> None:
    template, bos, eos, add_bos, control, _, placement, stops = FAMILIES[family]
    chat = GgufChat(template, bos, eos, add_bos, control)
    built = build_modelfile("m.Q4_K_M.gguf", chat, system="Be brief.")
    assert built.text.startswith("FROM ./m.Q4_K_M.gguf\n")
    assert built.stops == stops
    for stop in stops:
        assert f'PARAMETER stop "{stop}"' in built.text
    assert 'SYSTEM """Be brief."""' in built.text
    go = re.search(r'TEMPLATE """(.*?)"""', built.text, re.S).group(1)
    rendered = render_go(go, TWO_TURNS, modelfile_system="Be brief.")
    if placement == "none":
        assert any("no place for a system prompt" in w for w in built.warnings)
        assert rendered == render_go(go, TWO_TURNS)
    else:
        jinja = render_jinja(template, [{"role": "system", "content": "Be brief."}] + TWO_TURNS, bos, eos)
        assert rendered == (jinja[len(bos):] if add_bos else jinja)
        assert not built.warnings


def test_adapters_and_their_weights() -> None:
    chat = GgufChat(TINY, "<|endoftext|>", "<|endoftext|>", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    built = build_modelfile("base.F16.gguf", chat, adapters=[("a.lora.gguf", 1.0), ("b.lora.gguf", 0.5)])
    assert "ADAPTER ./a.lora.gguf\nADAPTER ./b.lora.gguf\n" in built.text
    assert any("weight 0.5" in w and "--lora-scaled b.lora.gguf 0.5" in w for w in built.warnings)
    assert any("several ADAPTER" in w for w in built.warnings)


def test_untranslatable_template_is_left_out_with_what_to_add() -> None:
    numbered = ("{% for message in messages %}Turn {{ loop.index }} {{ message['role'] }}: {{ message['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}Turn {{ messages|length + 1 }} assistant:{% endif %}")
    with pytest.raises(Untranslatable):
        analyze(numbered)
    built = build_modelfile("m.gguf", GgufChat(numbered, "", "", False, []))
    assert "TEMPLATE" not in built.text and "PARAMETER stop" not in built.text
    assert any("add a TEMPLATE" in w and "PARAMETER stop" in w for w in built.warnings)
    none = build_modelfile("m.gguf", GgufChat(None, "", "", False, []))
    assert none.text == "FROM ./m.gguf\n" and "no chat template" in none.warnings[0]


def test_system_placed_where_go_cannot_follow_is_untranslatable() -> None:
    """System text appended after the last user message: not a turn, not the first user message."""
    last = ("{% for message in messages %}{% if message['role'] == 'user' %}<u>{{ message['content'] }}"
            "{% if loop.last and messages[0]['role'] == 'system' %} ({{ messages[0]['content'] }}){% endif %}</u>"
            "{% elif message['role'] == 'assistant' %}<a>{{ message['content'] }}</a>{% endif %}{% endfor %}<a>")
    with pytest.raises(Untranslatable, match="system prompt"):
        analyze(last)


def test_stop_tokens_follow_the_assistant_suffix() -> None:
    fmt = analyze(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos=True)
    control = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
    assert stop_tokens(fmt, control, "<|end_of_text|>") == ["<|eot_id|>", "<|end_of_text|>"]


def test_templates_that_do_not_compile_or_fail_are_reported() -> None:
    broken = build_modelfile("m.gguf", GgufChat("{% for message in messages %}{{ message['content'] }", "", "", False, []))
    assert "TEMPLATE" not in broken.text and "does not compile" in broken.warnings[0]
    failing = build_modelfile("m.gguf", GgufChat("{{ messages[0]['content'].nope() }}", "", "", False, []))
    assert "TEMPLATE" not in failing.text and "fails" in failing.warnings[0]


def test_generation_blocks_render_as_their_content() -> None:
    """transformers' {% generation %} tag (assistant-token masks) must not stop a translation."""
    marked = TINY.replace("{{ '<|im_start|>' + message['role']",
                          "{% generation %}{{ '<|im_start|>' + message['role']").replace("{% endfor %}",
                                                                                   "{% endgeneration %}{% endfor %}")
    assert go_template(analyze(marked)) == go_template(analyze(TINY))
