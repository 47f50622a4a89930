"""TypeScript declarations and the JS method table of the Node client, from protocol/schema.json.

Three files come out, all under clients/node/src/:
- protocol.d.ts: an interface per schema type, the method map, the events, the error kinds;
- methods.js: the protocol version, the method table, the error codes and `SidecarMethods`, the
  base class of `SidecarClient` with one convenience method per protocol method;
- methods.d.ts: the declarations of methods.js.

Error codes and kinds are read from the schema's `errors` section ({"codes": {NAME: code},
"kinds": [...]}), which protocol/schema.py makes from protocol/errors.py.
"""

from __future__ import annotations

import json
import re

SRC = "clients/node/src"
HOST_NOTIFICATIONS = {"$/cancel"}  # sent by the host, not events the client receives
# members of SidecarClient a convenience method must not shadow ("then" would make the client a thenable)
RESERVED = {"call", "request", "notify", "start", "stop", "running", "pid", "serverInfo", "capabilities",
            "stderrTail", "exited", "constructor", "then"}


def generate(schema: dict) -> dict[str, str]:
    header = (
        f"// Generated from protocol/schema.json (protocol {schema['protocolVersion']}) by "
        "protocol/codegen/typescript.py.\n// Do not edit: change protocol/, then run `python -m protocol.schema` "
        "and `python -m protocol.codegen`.\n"
    )
    codes, kinds = _errors(schema)
    methods = [(name, _method_name(name), entry) for name, entry in sorted(schema["methods"].items())]
    _check_names(methods)
    return {
        f"{SRC}/protocol.d.ts": header + _protocol_dts(schema, methods, codes, kinds),
        f"{SRC}/methods.js": header + _methods_js(schema, methods, codes, kinds),
        f"{SRC}/methods.d.ts": header + _methods_dts(schema, methods, codes),
    }


# ----- naming


def _method_name(method: str) -> str:
    """`models/load` -> `modelsLoad`, `debug/stream` -> `debugStream`."""
    first, *rest = re.split(r"[/_.\-]", method)
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _check_names(methods: list[tuple[str, str, dict]]) -> None:
    seen: dict[str, str] = {}
    for method, name, _ in methods:
        if name in RESERVED or name in seen:
            raise ValueError(f"method {method!r} maps to the JS name {name!r}, already taken by {seen.get(name, 'SidecarClient')}")
        seen[name] = method


def _ref(node: dict) -> str:
    return node["$ref"].rsplit("/", 1)[1]


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_$]*", name) else json.dumps(name)


def _errors(schema: dict) -> tuple[dict[str, int], list[str]]:
    return dict(schema["errors"]["codes"]), list(schema["errors"]["kinds"])


# ----- JSON Schema -> TypeScript types


def _union(parts: list[str]) -> str:
    unique = list(dict.fromkeys(parts))
    return " | ".join(unique) if unique else "never"


def _ts(node: dict, indent: str = "") -> str:
    if "$ref" in node:
        return _ref(node)
    if "anyOf" in node:
        return _union([_ts(option, indent) for option in node["anyOf"]])
    if "enum" in node:
        return _union([json.dumps(value) for value in node["enum"]])
    if "const" in node:
        return json.dumps(node["const"])
    kind = node.get("type")
    if isinstance(kind, list):
        return _union([_ts({**node, "type": one}, indent) for one in kind])
    if kind == "string":
        return "string"
    if kind in ("integer", "number"):
        return "number"
    if kind in ("boolean", "null"):
        return kind
    if kind == "array":
        item = _ts(node["items"], indent) if "items" in node else "unknown"
        return f"({item})[]" if " | " in item else f"{item}[]"
    if kind == "object":
        if node.get("properties"):
            return "{\n" + _members(node, indent + "  ") + indent + "}"
        extra = node.get("additionalProperties")
        return f"{{ [key: string]: {_ts(extra, indent) if isinstance(extra, dict) else 'unknown'} }}"
    return "unknown"


def _doc(lines: list[str], indent: str) -> str:
    lines = [line.replace("*/", "*\\/") for line in lines if line]
    if not lines:
        return ""
    if len(lines) == 1:
        return f"{indent}/** {lines[0]} */\n"
    return f"{indent}/**\n" + "".join(f"{indent} * {line}\n" for line in lines) + f"{indent} */\n"


def _description(node: dict) -> list[str]:
    return [line.strip() for line in node.get("description", "").strip().splitlines()]


def _members(node: dict, indent: str) -> str:
    required = set(node.get("required", []))
    out = ""
    for name, prop in sorted(node.get("properties", {}).items()):
        default = prop.get("default")  # a null default says no more than the `?`
        doc = _description(prop) + ([f"@default {json.dumps(default)}"] if default is not None else [])
        optional = "" if name in required else "?"
        out += _doc(doc, indent) + f"{indent}{_key(name)}{optional}: {_ts(prop, indent)};\n"
    return out


def _definition(name: str, node: dict) -> str:
    doc = _doc(_description(node), "")
    if node.get("type") == "object" and "properties" in node:
        if not node["properties"]:
            return doc + f"export type {name} = Record<string, never>;\n"
        return doc + f"export interface {name} {{\n" + _members(node, "  ") + "}\n"
    return doc + f"export type {name} = {_ts(node)};\n"


def _method_doc(entry: dict) -> list[str]:
    notes = [entry["summary"]]
    if entry.get("runs_in") == "worker":
        notes.append("Runs in a worker process, through the job queue.")
    if entry.get("debug_only"):
        notes.append("Only when the sidecar runs with --debug.")
    return notes


def _protocol_dts(schema: dict, methods: list, codes: dict[str, int], kinds: list[str]) -> str:
    events = sorted(name for name in schema["notifications"] if name not in HOST_NOTIFICATIONS)
    out = [f'export type ProtocolVersion = {json.dumps(schema["protocolVersion"])};\n']
    out += [_definition(name, node) for name, node in sorted(schema["$defs"].items())]

    entries = "".join(
        _doc(_method_doc(entry), "  ")
        + f"  {json.dumps(method)}: {{ params: {_ref(entry['params'])}; result: {_ref(entry['result'])} }};\n"
        for method, _, entry in methods
    )
    out.append("/** Every method: its params and its result. */\n"
               f"export interface Methods {{\n{entries}}}\n")
    out.append("export type MethodName = keyof Methods;\n")
    out.append('export type MethodParams<M extends MethodName> = Methods[M]["params"];\n')
    out.append('export type MethodResult<M extends MethodName> = Methods[M]["result"];\n')

    event_map = "".join(f"  {json.dumps(name)}: {_ref(schema['notifications'][name]['params'])};\n" for name in events)
    out.append(f"/** The events the sidecar sends about a request, by method. */\nexport interface EventMap {{\n{event_map}}}\n")
    out.append("export type EventMethod = keyof EventMap;\n")
    variants = "".join(f'\n  | {{ jsonrpc: "2.0"; method: {json.dumps(name)}; params: {_ref(schema["notifications"][name]["params"])} }}'
                       for name in events)
    out.append(f"/** An event exactly as it arrives: switch on `method`. */\nexport type SidecarEvent ={variants};\n")

    out.append(f"export type ErrorCodeName = {_union([json.dumps(name) for name in sorted(codes)])};\n")
    out.append(f"export type ErrorCodeValue = {_union([str(codes[name]) for name in sorted(codes)])};\n")
    out.append(f"/** `error.data.kind` of a -32803 (request failed) error. */\nexport type ErrorKind = {_union([json.dumps(kind) for kind in sorted(kinds)])};\n")
    return "\n".join(out)


# ----- methods.js and its declarations


def _methods_js(schema: dict, methods: list, codes: dict[str, int], kinds: list[str]) -> str:
    table = "".join(
        f"  {json.dumps(method)}: {{ runsIn: {json.dumps(entry['runs_in'])}, debugOnly: {json.dumps(entry['debug_only'])}, "
        f"summary: {json.dumps(entry['summary'])} }},\n"
        for method, _, entry in methods
    )
    code_lines = "".join(f"  {name}: {codes[name]},\n" for name in sorted(codes))
    kind_lines = "".join(f"  {json.dumps(kind)},\n" for kind in sorted(kinds))
    conveniences = "".join(
        _doc(_method_doc(entry), "  ")
        + f"  {name}(params, options) {{\n    return this.call({json.dumps(method)}, params, options);\n  }}\n\n"
        for method, name, entry in methods
    ).rstrip("\n") + "\n"
    return (
        f"\n/** The protocol version this client speaks; sent in `initialize`. */\n"
        f"export const PROTOCOL_VERSION = {json.dumps(schema['protocolVersion'])};\n\n"
        f"/** Every method of the protocol: where it runs, whether it needs --debug, what it does. */\n"
        f"export const METHODS = Object.freeze({{\n{table}}});\n\n"
        f"/** JSON-RPC and sidecar error codes, by name. */\n"
        f"export const ErrorCode = Object.freeze({{\n{code_lines}}});\n\n"
        f"/** The values of `error.data.kind` in -32803 (request failed) errors. */\n"
        f"export const ERROR_KINDS = Object.freeze([\n{kind_lines}]);\n\n"
        f"/** One convenience method per protocol method; SidecarClient extends this and provides `call`. */\n"
        f"export class SidecarMethods {{\n{conveniences}}}\n"
    )


def _no_required(schema: dict, ref: str) -> bool:
    return not schema["$defs"][ref].get("required")


def _methods_dts(schema: dict, methods: list, codes: dict[str, int]) -> str:
    signatures = ""
    for method, name, entry in methods:
        params = _ref(entry["params"])
        optional = "?" if _no_required(schema, params) else ""
        signatures += _doc(_method_doc(entry), "  ")
        signatures += f"  {name}(params{optional}: P.{params}, options?: CallOptions): Promise<P.{_ref(entry['result'])}>;\n"
    code_lines = "".join(f"  readonly {name}: {codes[name]};\n" for name in sorted(codes))
    return (
        '\nimport type * as P from "./protocol.js";\nimport type { CallOptions } from "./index.js";\n\n'
        "export interface MethodInfo {\n  runsIn: \"sidecar\" | \"worker\";\n  debugOnly: boolean;\n  summary: string;\n}\n\n"
        f"export declare const PROTOCOL_VERSION: P.ProtocolVersion;\n"
        f"export declare const METHODS: {{ readonly [M in P.MethodName]: MethodInfo }};\n"
        f"export declare const ErrorCode: {{\n{code_lines}}};\n"
        f"export declare const ERROR_KINDS: readonly P.ErrorKind[];\n\n"
        "export declare abstract class SidecarMethods {\n"
        "  /** Send a request and wait for its result; events go to `options.onEvent`. */\n"
        "  abstract call<M extends P.MethodName>(method: M, params?: P.MethodParams<M>, options?: CallOptions): Promise<P.MethodResult<M>>;\n"
        f"{signatures}}}\n"
    )
