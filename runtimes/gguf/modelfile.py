"""An Ollama Modelfile beside an exported GGUF: FROM, ADAPTER, TEMPLATE, PARAMETER stop, SYSTEM.

Ollama does not run the model's Jinja chat template; it wants a Go template. We translate by
structure, not by recognising template source: the Jinja template is rendered (in a jinja2
sandbox set up as transformers' apply_chat_template sets it up) on probe conversations whose
contents are unique markers, and the text around the markers gives the strings of each turn: what comes before and after a user message
(the "after" includes the generation prompt), before and after an assistant message, where the
system prompt goes (its own turn, merged into the first user message, or nowhere), what the
template emits when no system prompt is given (a default system turn), and a leading BOS that
llama.cpp adds by itself. The Go template is built from those strings, and the translation is
accepted only if the same strings reproduce the Jinja output on longer conversations, with and
without a system prompt. So variants of a family (other spacing, a default system prompt, a
date header) translate, and a template whose structure differs (roles that do not alternate,
per-position special cases) is reported as untranslatable rather than written wrong.

End-of-turn tokens (PARAMETER stop): the control tokens that close an assistant turn, then EOS and
the other tokens llama.cpp itself ends generation on, all read from the GGUF by llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Marker contents: letters that no template adds or changes, unlikely to occur in any template.
_U1, _A1, _U2, _A2, _U3, _SYS = "Qzu1x", "Qza1x", "Qzu2x", "Qza2x", "Qzu3x", "Qzs0x"

class Untranslatable(Exception):
    """The chat template's structure has no Go-template equivalent here; the message says why."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template reduced to the strings around each turn."""

    bos: str  # rendered first by the template and added by llama.cpp's tokenizer: left out of the Go template
    default_system: str  # emitted where the system turn would be when no system prompt is given
    system: str  # "turn" (a turn of its own), "first_user" (prefixed to the first user message) or "none"
    system_prefix: str
    system_suffix: str  # for "first_user": the separator between the system text and the user's
    user_prefix: str
    user_suffix: str  # includes the generation prompt (the assistant header)
    assistant_prefix: str
    assistant_suffix: str

    @property
    def family(self) -> str:
        """A name for people (logs, model card); the translation never depends on it."""
        text = self.user_prefix + self.user_suffix + self.assistant_suffix
        for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<start_of_turn>", "gemma"),
                             ("[INST]", "mistral"), ("<|user|>", "phi3")):
            if marker in text:
                return name
        return "other"

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template renders (mirrors go_template; Ollama prepends no BOS itself)."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        out = []
        if self.system == "turn":
            out.append(self.system_prefix + system + self.system_suffix if system else self.default_system)
        else:
            out.append(self.default_system)
        first_user = True
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "user":
                if first_user and system and self.system == "first_user":
                    content = system + self.system_suffix + content
                first_user = False
                out.append(self.user_prefix + content + self.user_suffix)
            elif role == "assistant":
                out.append(self.assistant_prefix + content + self.assistant_suffix)
        return "".join(out)


def _go_literal(text: str) -> str:
    """Template text as Go's text/template prints it: only '{{' needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: ChatFormat) -> str:
    """The Go template for Ollama's TEMPLATE. No trim markers: every byte of literal text counts."""
    lit = _go_literal
    if fmt.system == "turn":
        head = f"{{{{ if .System }}}}{lit(fmt.system_prefix)}{{{{ .System }}}}{lit(fmt.system_suffix)}"
        head += f"{{{{ else }}}}{lit(fmt.default_system)}{{{{ end }}}}" if fmt.default_system else "{{ end }}"
    else:
        head = lit(fmt.default_system)
    user = lit(fmt.user_prefix)
    if fmt.system == "first_user":  # Ollama puts the system message first: the first user message is index 1
        user += f"{{{{ if and $.System (eq $i 1) }}}}{{{{ $.System }}}}{lit(fmt.system_suffix)}{{{{ end }}}}"
    user += "{{ .Content }}" + lit(fmt.user_suffix)
    assistant = lit(fmt.assistant_prefix) + "{{ .Content }}" + lit(fmt.assistant_suffix)
    return (f'{head}{{{{ range $i, $m := .Messages }}}}{{{{ if eq .Role "user" }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{assistant}{{{{ end }}}}{{{{ end }}}}')


# --------------------------------------------------------------------------------------------
# From a Jinja template to a ChatFormat


def _renderer(template: str, bos_token: str, eos_token: str) -> Any:
    """Render as transformers' apply_chat_template does (its sandboxed Jinja settings, its globals),
    with jinja2 alone: importing transformers would cost more than the whole translation."""
    import json
    import time as clock

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} marks assistant text; rendering ignores it
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: clock.strftime(fmt))
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateError as exc:
        raise Untranslatable(f"the template does not compile ({exc})") from None

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=generation, bos_token=bos_token,
                                   eos_token=eos_token)
        except jinja2.exceptions.TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - template code failing on our probe is a template error
            raise jinja2.exceptions.TemplateError(f"{type(exc).__name__}: {exc}") from None

    return render


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _split(text: str, markers: list[str]) -> list[str]:
    """The text between the markers (len(markers) + 1 pieces); each marker must occur exactly once, in order."""
    pieces, rest = [], text
    for marker in markers:
        if text.count(marker) != 1 or marker not in rest:
            raise Untranslatable("a message's content is not written exactly once and in order")
        before, _, rest = rest.partition(marker)
        pieces.append(before)
    return pieces + [rest]


def analyze(template: str, *, bos_token: str = "", eos_token: str = "", add_bos: bool = False) -> ChatFormat:
    """The turn strings of a Jinja chat template, verified on longer conversations; raises Untranslatable."""
    from jinja2 import TemplateError

    render = _renderer(template, bos_token, eos_token)
    conversation = [_user(_U1), _assistant(_A1), _user(_U2)]
    try:
        head, mid1, mid2, tail = _split(render(conversation, True), [_U1, _A1, _U2])
        closed = render([_user(_U1), _assistant(_A1)], False)
    except TemplateError as exc:
        raise Untranslatable(f"the template fails on a plain user/assistant conversation ({exc})") from None
    end = closed.partition(_A1)[2] if closed.count(_A1) == 1 else ""
    split = _user_prefix_start(head, mid2, end, bos_token)
    assistant_suffix, user_prefix = mid2[:split], mid2[split:]
    first = head[: len(head) - len(user_prefix)]
    if not mid1.startswith(tail):
        raise Untranslatable("the generation prompt differs from what opens an assistant turn")
    user_suffix, assistant_prefix = tail, mid1[len(tail):]
    bos = bos_token if add_bos and bos_token and first.startswith(bos_token) else ""
    default_system = first[len(bos):]
    body = head[len(first):] + _U1 + mid1 + _A1 + mid2 + _U2 + tail
    system = _system_placement(render, conversation, bos, default_system, user_prefix, body)
    fmt = ChatFormat(bos, default_system, *system, user_prefix, user_suffix, assistant_prefix, assistant_suffix)
    _verify(fmt, render)
    return fmt


def _user_prefix_start(head: str, between: str, end: str, bos_token: str) -> int:
    """Where, in the text between an answer and the next question, the user prefix starts.

    The same prefix must open the first question (after a BOS or a default system turn). Best:
    the whole text before the first question is (BOS +) the prefix. Else split where the closed
    conversation's ending stops matching, so the assistant suffix keeps the end-of-turn token,
    never inside a <...> token.
    """
    for first in ("", bos_token) if bos_token and head.startswith(bos_token) else ("",):
        if between.endswith(head[len(first):]):
            return len(between) - len(head) + len(first)
    common = next((i for i, (a, b) in enumerate(zip(end, between)) if a != b), min(len(end), len(between)))
    for k in range(common, -1, -1):
        if between[:k].rfind("<") <= between[:k].rfind(">") and head.endswith(between[k:]):
            return k
    raise Untranslatable("the first user turn is not opened like the later ones")


def _system_placement(render: Any, conversation: list[dict[str, str]], bos: str, default_system: str, user_prefix: str,
                      body: str) -> tuple[str, str, str]:
    from jinja2 import TemplateError

    try:
        with_system = render([{"role": "system", "content": _SYS}] + conversation, True)
    except TemplateError:
        return "none", "", ""  # the template refuses a system role (raise_exception)
    if _SYS not in with_system:
        return "none", "", ""  # the template drops it
    if with_system.startswith(bos) and with_system.endswith(body):
        block = with_system[len(bos): len(with_system) - len(body)]
        if block.count(_SYS) == 1:
            prefix, _, suffix = block.partition(_SYS)
            return "turn", prefix, suffix
    merged = bos + default_system + user_prefix + _SYS
    if with_system.startswith(merged) and not default_system:
        rest = with_system[len(merged):]
        separator = rest.partition(_U1)[0]
        if bos + default_system + user_prefix + _SYS + separator + body[len(user_prefix):] == with_system:
            return "first_user", "", separator
    raise Untranslatable("the template places the system prompt where a Go template cannot follow it")


def _verify(fmt: ChatFormat, render: Any) -> None:
    longer = [_user(_U1), _assistant(_A1), _user(_U2), _assistant(_A2), _user(_U3)]
    cases = [longer, [_user(_U1)]]
    if fmt.system != "none":
        cases += [[{"role": "system", "content": _SYS}] + longer, [{"role": "system", "content": _SYS}, _user(_U1)]]
    from jinja2 import TemplateError

    for messages in cases:
        try:
            expected = render(messages, True)
        except TemplateError as exc:
            raise Untranslatable(f"the template fails on a {len(messages)}-message conversation ({exc})") from None
        if fmt.bos + fmt.render(messages) != expected:
            raise Untranslatable(f"the turn structure found does not reproduce a {len(messages)}-message conversation")


def stop_tokens(fmt: ChatFormat, control_tokens: list[str], eos_token: str | None, eog_tokens: list[str] = ()) -> list[str]:
    """Control tokens that end an assistant turn (where the template has them), then EOS and the
    other tokens llama.cpp ends generation on."""
    closing = fmt.assistant_suffix or fmt.user_prefix
    stops = sorted((t for t in control_tokens if t and t in closing), key=closing.index)
    for token in [eos_token] + list(eog_tokens) if eos_token in control_tokens else list(eog_tokens):
        if token and token not in stops:
            stops.append(token)
    return stops


# --------------------------------------------------------------------------------------------
# The GGUF's own tokenizer metadata, and the Modelfile text


@dataclass(frozen=True)
class GgufChat:
    template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    control_tokens: list[str]
    eog_tokens: list[str] = ()  # what llama.cpp ends generation on


def read_gguf_chat(path: Path) -> GgufChat:
    """The chat template and special tokens as llama.cpp will see them (its own vocabulary-only load)."""
    from runtimes.gguf.quantize import inspect_gguf

    info = inspect_gguf(path)
    return GgufChat(info.chat_template, info.bos_token, info.eos_token, info.add_bos, info.control_tokens,
                    info.eog_tokens)


@dataclass
class Modelfile:
    text: str
    family: str | None
    stops: list[str]
    warnings: list[str]


def _triple_quoted(text: str) -> str | None:
    return None if '"""' in text else f'"""{text}"""'


def build_modelfile(gguf_name: str, chat: GgufChat, *, adapters: list[tuple[str, float]] = (),
                    system: str | None = None) -> Modelfile:
    """The Modelfile text for a GGUF (and adapter GGUFs) in the same directory, with what could not be said."""
    warnings: list[str] = []
    lines = [f"FROM ./{gguf_name}"]
    for name, weight in adapters:
        lines.append(f"ADAPTER ./{name}")
        if weight != 1.0:
            warnings.append(f"Ollama applies ADAPTER {name} at full strength; its weight {weight} is honoured only by "
                            f"llama.cpp (--lora-scaled {name} {weight}) or by merging (merge: true)")
    if len(adapters) > 1:
        warnings.append("the Modelfile names several ADAPTER files; if Ollama refuses more than one, export with merge: true")
    family, stops = None, []
    what_to_add = ("add a TEMPLATE with the model's prompt format in Go template syntax and a PARAMETER stop line per "
                   "end-of-turn token (see https://github.com/ollama/ollama/blob/main/docs/template.md)")
    if not chat.template:
        warnings.append(f"the model has no chat template, so the Modelfile has no TEMPLATE: {what_to_add}")
    else:
        try:
            fmt = analyze(chat.template, bos_token=chat.bos_token, eos_token=chat.eos_token, add_bos=chat.add_bos)
        except Untranslatable as exc:
            warnings.append(f"the chat template could not be translated for Ollama ({exc}), so the Modelfile has no "
                            f"TEMPLATE: {what_to_add}")
        else:
            quoted = _triple_quoted(go_template(fmt))
            if quoted is None:
                warnings.append(f'the translated template contains """, which a Modelfile cannot quote: {what_to_add}')
            else:
                family = fmt.family
                stops = stop_tokens(fmt, chat.control_tokens, chat.eos_token, chat.eog_tokens)
                lines.append(f"TEMPLATE {quoted}")
                lines.extend(f'PARAMETER stop "{stop}"' for stop in stops if '"' not in stop)
                if system and fmt.system == "none":
                    warnings.append("the model's chat template has no place for a system prompt, so Ollama will not "
                                    "show SYSTEM to the model")
    if system:
        quoted = _triple_quoted(system)
        if quoted is None:
            warnings.append('the system prompt contains """, which a Modelfile cannot quote; SYSTEM is left out')
        else:
            lines.append(f"SYSTEM {quoted}")
    return Modelfile("\n".join(lines) + "\n", family, stops, warnings)
