"""The committed JSON Schema matches the msgspec types, and every method of the contract is implemented."""

import json

from handlers import IMPLEMENTATIONS
from protocol.methods import METHODS
from protocol.schema import SCHEMA_PATH, build_schema, schema_json

LIFECYCLE = {"initialize", "ping", "status", "shutdown"}


def test_committed_schema_is_current():
    assert SCHEMA_PATH.read_text() == schema_json(), "protocol/schema.json is stale: run `python -m protocol.schema`"


def test_every_method_has_params_and_result_in_the_schema():
    schema = build_schema()
    for name in METHODS:
        entry = schema["methods"][name]
        for part in ("params", "result"):
            ref = entry[part]["$ref"].rsplit("/", 1)[1]
            assert ref in schema["$defs"], (name, part)


def test_params_schemas_forbid_unknown_fields():
    schema = build_schema()
    for name, contract in METHODS.items():
        definition = schema["$defs"][contract.params.__name__]
        assert definition.get("additionalProperties") is False, name


def test_every_method_is_implemented():
    assert set(METHODS) - LIFECYCLE == set(IMPLEMENTATIONS)


def test_schema_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(json.loads(schema_json()))
