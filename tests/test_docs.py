"""The repository cites only itself: every ``docs/method.md, "Section"`` citation names a
section of docs/method.md, and nothing cites documents outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [
    *sorted((REPO / "xtd").rglob("*.py")),
    *sorted((REPO / "tests").rglob("*.py")),
    *sorted((REPO / "bench").rglob("*.py")),
    *sorted((REPO / "experiments").rglob("*.py")),
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "README.md",
]
CITATION = re.compile(r"""docs/method\.md,\s+((?:["'][^"'\n]+["'](?:\s*(?:,|to|and)\s*)?)+)""")


def test_every_method_citation_names_a_section() -> None:
    sections = {
        line[3:].strip() for line in (REPO / "docs" / "method.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }  # fmt: skip
    cited: dict[str, list[str]] = {}
    for path in SOURCES:
        if path.name == "test_docs.py":
            continue
        text = " ".join(path.read_text(encoding="utf-8").split())  # citations may wrap lines
        for match in CITATION.finditer(text):
            for title in re.findall(r"""["']([^"']+)["']""", match.group(1)):
                cited.setdefault(title, []).append(str(path.relative_to(REPO)))
    assert len(cited) >= 10, cited  # the code does cite the method
    unknown = {title: where[:3] for title, where in cited.items() if title not in sections}
    assert not unknown, f"citations of sections docs/method.md does not have: {unknown}"


def test_nothing_cites_documents_outside_the_repository() -> None:
    # the names are split so that this file does not cite them either
    names = [("spec/", "ALM"), ("spec ", "§"), ("DESIGN", ".md"), ("STYLE", ".md"), ("ASSETS", ".md"), ("../", "shared")]
    outside = re.compile("|".join(re.escape(a + b) for a, b in names))
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for path in SOURCES
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)
    ]  # fmt: skip
    assert not found, found
    assert "docs/method.md" in (REPO / "README.md").read_text(encoding="utf-8")
