"""The clients' generated protocol types match protocol/schema.json (re-run `python -m protocol.codegen`)."""

from protocol.codegen import ROOT, generated_files


def test_generated_client_types_are_current():
    files = generated_files()
    assert files, "the code generators produced no file"
    for path, text in files.items():
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `python -m protocol.codegen`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run `python -m protocol.codegen`"
