"""References into the docs resolve: every ``METHOD.md section N`` the code, configs and
README cite is a section of docs/METHOD.md, and no file names a path of one machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".yaml", ".toml", ".sh", ".txt", ".conf", ".cfg")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout
    names = out.split() or [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()]
    return [REPO / n for n in names if n.endswith(TEXT) and (REPO / n).is_file()]


def test_method_references_resolve():
    method = (REPO / "docs" / "METHOD.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", method, re.M))
    cited = []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for match in re.finditer(
            r"(\S*)METHOD\.md\)?(?: layout \()?,? ?(?:section|§)? ?(\d+)?", text
        ):
            if path.name == "METHOD.md" or path.name == "test_docs.py":
                continue
            assert "docs/METHOD.md" in match.group(0) or path.parent.name == "docs", (
                f"{path.relative_to(REPO)}: {match.group(0)!r} does not point at docs/METHOD.md"
            )
            if match.group(2):
                cited.append((path.relative_to(REPO), match.group(2)))
    assert cited
    assert [c for c in cited if c[1] not in sections] == []


def test_no_machine_paths():
    pattern = re.compile(r"/work/|/home/(?!m2diff/)|/Users/")
    bad = [
        str(p.relative_to(REPO))
        for p in tracked_text_files()
        if p.name != "test_docs.py" and pattern.search(p.read_text(errors="replace"))
    ]
    assert bad == []
