"""The README's command lines, run as written. The quickstart covers the ones that need a trained
model; here run the ones that are fast and need nothing but the repository."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = [REPO / "README.md", REPO / "README_CN.md"]  # the Chinese one is for the seed's users
RUNNABLE = ("python plan.py", "python -m data ")
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9_]*(DIR|PATH|NAME)\b|CFG|OUT_DIR")


def commands(readme: Path) -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = line.split("   #")[0].strip()
            if line.startswith(RUNNABLE) and not PLACEHOLDER.search(line):
                out.append(line)
    return out


def all_commands() -> list[str]:
    return sorted({c for r in READMES for c in commands(r)})


def test_the_readme_has_runnable_commands() -> None:
    found = commands(REPO / "README.md")
    assert any(c.startswith("python plan.py") for c in found)
    assert sum(c.startswith("python -m data") for c in found) >= 3


@pytest.mark.parametrize("command", all_commands())
def test_readme_command_runs(command: str) -> None:
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_chinese_readme_shows_the_same_commands() -> None:
    """Both READMEs document the same command lines (the Chinese one is for the seed's users)."""
    assert commands(REPO / "README_CN.md") == commands(REPO / "README.md")
