"""The README points at things that ship and its shell examples work as written."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_SHIPPED = {"docker/.env"}  # made by the user from docker/.env.example


def test_the_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "DESIGN.md").is_file()
    assert "](docs/DESIGN.md)" in README
    bare = [m.start() for m in re.finditer(r"(?<![/\w])DESIGN\.md", README)]
    assert not bare, "every pointer to the design document should say docs/DESIGN.md"


def test_every_repository_path_the_readme_names_exists():
    names = set(re.findall(r"(?<![\w./-])((?:\.ci|bench|clients|docker|docs|kernels|model|server|tests)/[\w./-]*\w/?)",
                           README))
    assert "clients/cli.py" in names  # the examples' input file
    missing = sorted(n for n in names - NOT_SHIPPED if not (ROOT / n).exists())
    assert not missing, f"the README names paths that are not in the repository: {missing}"
    for name in ("requirements.lock", "docker/.env.example"):
        assert name in README and (ROOT / name).is_file()


def test_a_snapshot_body_comes_from_a_file():
    """A base64 snapshot is too large for an argument list (`Argument list too long`)."""
    assert not re.search(r"curl[^\n]*(\\\n[^\n]*)*-d\s+\"[^\"]*\$\(base64", README)
    assert re.search(r"curl -X POST \S+/v1/sessions .*--data-binary @(\S+)", README)
