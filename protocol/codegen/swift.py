"""Swift `Codable` types for the Swift client (clients/swift), generated from protocol/schema.json.

One file: a struct per params/result/event type reachable from the method table, open enums for
Literal values (a newer sidecar may add one, and decoding must not fail on it), enums with
payloads for unions, the error codes and kinds, the event enum and a typed call per method.

Field mapping, so that "left out" and "null" stay apart where the sidecar tells them apart:
  required                          -> T      (T? when it may be null)
  optional with a default           -> T?     nil is left out, the sidecar's default applies
  optional, nullable, no default    -> T??    nil is left out; .some(nil) is sent as null
"""

from __future__ import annotations

import json
import re
from typing import Any

OUTPUT = "clients/swift/Sources/MLSidecar/Protocol.generated.swift"

# Methods the client drives itself (start() and shutdown()), so they get no generated call.
LIFECYCLE = {"initialize", "shutdown"}

SWIFT_KEYWORDS = {
    "as", "associatedtype", "break", "case", "catch", "class", "continue", "default", "defer", "deinit",
    "do", "else", "enum", "extension", "fallthrough", "false", "fileprivate", "for", "func", "guard", "if",
    "import", "in", "init", "inout", "internal", "is", "let", "nil", "operator", "private", "protocol",
    "public", "repeat", "rethrows", "return", "self", "Self", "static", "struct", "subscript", "super",
    "switch", "throw", "throws", "true", "try", "Type", "typealias", "var", "where", "while",
}
# Nested type names that would shadow a standard or Foundation type inside their struct.
SHADOWING = {"Data", "Date", "URL", "String", "Int", "Double", "Bool", "Array", "Dictionary", "Error",
             "Optional", "Result", "Type", "Protocol", "Self", "Any", "Set", "Value"}

SCALARS = {"string": "String", "integer": "Int", "number": "Double", "boolean": "Bool"}
CASE_FOR = {"string": "string", "integer": "int", "number": "double", "boolean": "bool",
            "array": "array", "object": "object"}
LITERALS = {"string": ("ExpressibleByStringLiteral", "stringLiteral", "String"),
            "integer": ("ExpressibleByIntegerLiteral", "integerLiteral", "Int"),
            "number": ("ExpressibleByFloatLiteral", "floatLiteral", "Double")}


def generate(schema: dict) -> dict[str, str]:
    return {OUTPUT: _Generator(schema).render()}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", name) if w]


def upper_camel(name: str) -> str:
    return "".join(w[0].upper() + w[1:] for w in _words(name)) or "Value"


def lower_camel(name: str) -> str:
    words = _words(name)
    if not words:
        return "value"
    text = words[0][0].lower() + words[0][1:] + "".join(w[0].upper() + w[1:] for w in words[1:])
    return "_" + text if text[0].isdigit() else text


def identifier(name: str) -> str:
    return f"`{name}`" if name in SWIFT_KEYWORDS else name


def swift_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def doc(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    return [f"{indent}/// {line.strip()}".rstrip() for line in text.strip().splitlines()]


class _Generator:
    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self.defs: dict[str, dict] = schema["$defs"]

    # ----- what to generate

    def reachable(self) -> list[str]:
        roots = [m[k] for m in self.schema["methods"].values() for k in ("params", "result")]
        roots += [n["params"] for n in self.schema["notifications"].values()]
        seen: set[str] = set()
        stack = [self.ref_name(r) for r in roots]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            stack += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(self.defs[name]))
        return sorted(seen)

    @staticmethod
    def ref_name(node: dict) -> str:
        return node["$ref"].rsplit("/", 1)[1]

    # ----- types

    def swift_type(self, node: dict, name: str, nested: list[str], indent: str) -> tuple[str, bool]:
        """The Swift type of a schema node and whether it may be null; nested types go to `nested`."""
        if "$ref" in node:
            return self.ref_name(node), False
        if "anyOf" in node:
            branches = [b for b in node["anyOf"] if b.get("type") != "null"]
            nullable = len(branches) < len(node["anyOf"])
            if len(branches) == 1:
                return self.swift_type(branches[0], name, nested, indent)[0], nullable
            if all("enum" in b for b in branches):
                values = sorted({v for b in branches for v in b["enum"]})
                return self.swift_type({"enum": values}, name, nested, indent)[0], nullable
            if sorted(b.get("type", "") for b in branches) == ["integer", "string"]:
                return "RequestID", nullable
            type_name = self.nested_name(name)
            nested.append(self.render_union(type_name, branches, indent))
            return type_name, nullable
        if "enum" in node:
            type_name = self.nested_name(name)
            nested.append(self.render_string_enum(type_name, node["enum"], indent, node.get("description")))
            return type_name, False
        kind = node.get("type")
        if kind in SCALARS:
            return SCALARS[kind], False
        if kind == "array":
            item = self.swift_type(node["items"], name[:-1] if name.endswith("s") else name + "Item", nested, indent)
            return f"[{item[0]}{'?' if item[1] else ''}]", False
        if kind == "object" and isinstance(node.get("additionalProperties"), dict):
            value = self.swift_type(node["additionalProperties"], name + "Value", nested, indent)
            return f"[String: {value[0]}{'?' if value[1] else ''}]", False
        if kind == "object":
            return "[String: JSONValue]", False
        if kind == "null":
            return "JSONValue", True
        return "JSONValue", False  # no type: any JSON value

    def nested_name(self, field: str) -> str:
        name = upper_camel(field)
        return name + "Value" if name in SHADOWING or name in self.defs else name

    def render_string_enum(self, name: str, values: list[Any], indent: str, description: str | None = None) -> str:
        inner = indent + "    "
        lines = doc(description, indent) + [
            f"{indent}public struct {name}: StringEnum {{",
            f"{inner}public let rawValue: String",
            f"{inner}public init(rawValue: String) {{ self.rawValue = rawValue }}",
        ]
        lines += [f"{inner}public static let {identifier(lower_camel(str(v)))}: Self = {swift_string(str(v))}"
                  for v in sorted(values)]
        return "\n".join(lines + [f"{indent}}}"])

    def render_union(self, name: str, branches: list[dict], indent: str) -> str:
        """An enum with one case per branch; decoding tries integers before other numbers."""
        inner, body = indent + "    ", indent + "        "
        order = {"integer": 0, "number": 1}
        branches = sorted(branches, key=lambda b: order.get(b.get("type", ""), 2))
        cases, decoders, encoders, literals = [], [], [], []
        nested: list[str] = []
        for branch in branches:
            if "enum" in branch:
                for value in sorted(branch["enum"]):
                    case = identifier(lower_camel(str(value)))
                    cases.append(f"{inner}case {case}")
                    decoders.append(f"{body}if let v = try? c.decode(String.self), v == {swift_string(value)} {{ self = .{case}; return }}")
                    encoders.append(f"{body}case .{case}: try c.encode({swift_string(value)})")
                continue
            case = lower_camel(self.ref_name(branch)) if "$ref" in branch else CASE_FOR[branch["type"]]
            swift, _ = self.swift_type(branch, name + "Item", nested, inner)
            cases.append(f"{inner}case {identifier(case)}({swift})")
            decoders.append(f"{body}if let v = try? c.decode({swift}.self) {{ self = .{case}(v); return }}")
            encoders.append(f"{body}case .{case}(let v): try c.encode(v)")
            if branch.get("type") in LITERALS:
                protocol, label, literal = LITERALS[branch["type"]]
                literals.append((protocol, f"{inner}public init({label} value: {literal}) {{ self = .{case}(value) }}"))
            elif branch.get("type") == "array":
                element = swift[1:-1]
                literals.append(("ExpressibleByArrayLiteral",
                                 f"{inner}public init(arrayLiteral elements: {element}...) {{ self = .{case}(elements) }}"))
        conformances = ", ".join(["Codable", "Hashable", "Sendable"] + [p for p, _ in literals])
        expected = ", ".join(self.describe(b) for b in branches)
        lines = [f"{indent}public enum {name}: {conformances} {{", *cases, *nested, *[init for _, init in literals],
                 f"{inner}public init(from decoder: any Decoder) throws {{",
                 f"{body}let c = try decoder.singleValueContainer()", *decoders,
                 f"{body}throw DecodingError.dataCorruptedError(in: c, debugDescription: {swift_string('expected ' + expected)})",
                 f"{inner}}}",
                 f"{inner}public func encode(to encoder: any Encoder) throws {{",
                 f"{body}var c = encoder.singleValueContainer()",
                 f"{body}switch self {{", *encoders, f"{body}}}",
                 f"{inner}}}",
                 f"{indent}}}"]
        return "\n".join(lines)

    def describe(self, branch: dict) -> str:
        if "$ref" in branch:
            return self.ref_name(branch)
        if "enum" in branch:
            return " or ".join(json.dumps(v) for v in sorted(branch["enum"]))
        return branch.get("type", "any value")

    def render_struct(self, name: str) -> str:
        node = self.defs[name]
        properties: dict[str, dict] = node.get("properties", {})
        required: list[str] = node.get("required", [])
        order = [p for p in required if p in properties] + sorted(p for p in properties if p not in required)
        fields, nested = [], []
        for prop in order:
            spec = properties[prop]
            swift, nullable = self.swift_type(spec, prop, nested, "    ")
            if prop in required:
                full, default, note = swift + ("?" if nullable else ""), "", None
            elif nullable and "default" not in spec:
                full, default, note = swift + "??", " = nil", "nil leaves it out; `.some(nil)` sends null."
            else:
                full, default = swift + "?", " = nil"
                note = f"Default: `{json.dumps(spec['default'])}`." if "default" in spec else None
            fields.append((prop, lower_camel(prop), full, default, note, spec.get("description")))
        lines = doc(node.get("description"), "") + [f"public struct {name}: Codable, Hashable, Sendable {{"]
        for _, swift_name, full, _, note, description in fields:
            lines += doc(description, "    ") + doc(note, "    ")
            lines.append(f"    public var {identifier(swift_name)}: {full}")
        arguments = ", ".join(f"{swift_name}: {full}{default}" for _, swift_name, full, default, _, _ in fields)
        lines.append(f"    public init({arguments}) {{")
        lines += [f"        self.{swift_name} = {swift_name}" for _, swift_name, *_ in fields]
        lines.append("    }")
        if fields:
            lines.append("    enum CodingKeys: String, CodingKey {")
            lines += [f"        case {identifier(s)}" + (f" = {swift_string(p)}" if s != p else "") for p, s, *_ in fields]
            lines.append("    }")
        lines += nested
        return "\n".join(lines + ["}"])

    # ----- errors, events and calls

    def errors(self) -> tuple[dict[str, int], list[str]]:
        """Error codes and kinds, from the schema's `errors` section (protocol/errors.py's ErrorCode and ErrorKind)."""
        return dict(self.schema["errors"]["codes"]), list(self.schema["errors"]["kinds"])

    def render_errors(self) -> str:
        codes, kinds = self.errors()
        lines = ["/// JSON-RPC error codes the sidecar sends; open, so a newer sidecar's code still decodes.",
                 "public struct ErrorCode: RawRepresentable, Codable, Hashable, Sendable {",
                 "    public let rawValue: Int",
                 "    public init(rawValue: Int) { self.rawValue = rawValue }"]
        lines += [f"    public static let {lower_camel(n.lower())} = ErrorCode(rawValue: {v})"
                  for n, v in sorted(codes.items(), key=lambda item: item[0])]
        lines.append("}")
        lines.append("")
        lines.append(self.render_string_enum("ErrorKind", kinds, "",
                                             "`data.kind` of a -32803 \"request failed\" error."))
        return "\n".join(lines)

    def events(self) -> list[tuple[str, str]]:
        """Sidecar-to-host notifications (their params type is an *Event), as (method, type)."""
        found = [(method, self.ref_name(n["params"])) for method, n in self.schema["notifications"].items()]
        return sorted((method, t) for method, t in found if t.endswith("Event"))

    def render_events(self) -> str:
        events = self.events()
        case = {method: lower_camel(method) for method, _ in events}
        lines = ["/// An event the sidecar sends about one request before its response.",
                 "public enum SidecarEvent: Hashable, Sendable {"]
        lines += [f"    /// `{m}`\n    case {case[m]}({t})" for m, t in events]
        lines += ["    /// The request this event belongs to.",
                  "    public var requestID: RequestID {",
                  "        switch self {"]
        lines += [f"        case .{case[m]}(let event): event.id" for m, _ in events]
        lines += ["        }", "    }",
                  "    /// Decodes the params of notification `method`; nil for a method that is not an event.",
                  "    static func decode<Key: CodingKey>(method: String, from container: KeyedDecodingContainer<Key>, forKey key: Key) throws -> SidecarEvent? {",
                  "        switch method {"]
        lines += [f"        case {swift_string(m)}: .{case[m]}(try container.decode({t}.self, forKey: key))" for m, t in events]
        lines += ["        default: nil", "        }", "    }", "}"]
        return "\n".join(lines)

    def render_calls(self) -> str:
        lines = ["extension SidecarClient {"]
        for method, contract in sorted(self.schema["methods"].items()):
            if method in LIFECYCLE:
                continue
            params, result = self.ref_name(contract["params"]), self.ref_name(contract["result"])
            summary = contract["summary"] + (" Needs a sidecar started with `--debug`." if contract["debug_only"] else "")
            lines += doc(summary, "    ") + [f"    /// `{method}`, runs in the {contract['runs_in']}."]
            timeout = "timeout: Duration? = nil"
            if params == "Empty":
                signature, value = timeout, "Empty()"
            else:
                default = " = .init()" if not self.defs[params].get("required") else ""
                signature, value = f"_ params: {params}{default}, {timeout}", "params"
            lines += [f"    public func {identifier(lower_camel(method))}({signature}) -> RequestStream<{result}> {{",
                      f"        request({swift_string(method)}, params: {value}, as: {result}.self, timeout: timeout)",
                      "    }"]
        return "\n".join(lines + ["}"])

    def render(self) -> str:
        header = [
            "// GENERATED by protocol/codegen/swift.py from protocol/schema.json: do not edit.",
            "// Regenerate from the repository root with `python -m protocol.codegen`.",
            "",
            "import Foundation",
            "",
            "/// The protocol version this client speaks, sent in `initialize`.",
            "public enum SidecarProtocol {",
            f"    public static let version = {swift_string(self.schema['protocolVersion'])}",
            "}",
        ]
        request_id = self.render_union("RequestID", [{"type": "integer"}, {"type": "string"}], "")
        parts = ["\n".join(header), self.render_errors(), self.render_events(), self.render_calls(),
                 "/// A request id: an integer or a string chosen by the host.\n" + request_id]
        parts += [self.render_struct(name) for name in self.reachable()]
        return "\n\n".join(parts) + "\n"
