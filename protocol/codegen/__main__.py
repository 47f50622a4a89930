"""`python -m protocol.codegen`: regenerate the clients' protocol types from protocol/schema.json."""

from __future__ import annotations

from protocol.codegen import ROOT, generated_files

if __name__ == "__main__":
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
