"""Every Python example of docs/api.md runs, in order, in one namespace.

Convention: a fenced block opened with three backticks and ``python`` is executed; one
opened with ``python skip`` is shown to readers but not run (a section whose API does not
exist yet). The blocks run in an empty working directory with their own calibration
cache (``SIMGEN_CACHE``), so the first one that needs the incoherent model calibrates it
(about 10 s).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
FENCE = re.compile(r"^```python(?P<tag>[^\n]*)\n(?P<code>.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    return [(m["tag"].strip(), m["code"]) for m in FENCE.finditer(DOC.read_text())]


def test_the_page_has_examples_and_skips_only_tagged_ones():
    tags = [tag for tag, _ in blocks()]
    assert tags.count("") >= 4
    assert set(tags) <= {"", "skip"}


def test_every_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMGEN_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": "docs_api"}
    for n, (tag, code) in enumerate(blocks()):
        if tag == "skip":
            continue
        try:
            exec(compile(code, f"{DOC.name}[block {n}]", "exec"), namespace)
        except Exception as err:  # name the block that failed
            pytest.fail(f"docs/api.md block {n} failed: {type(err).__name__}: {err}\n{code}")
