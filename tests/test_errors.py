"""One helper turns an exception into the one line that an error message quotes."""

from __future__ import annotations

import re
from pathlib import Path

import gradcam_batch.cli
import gradcam_batch.engine
from gradcam_batch.engine.errors import first_line


def test_first_line_of_an_exception():
    assert first_line(ValueError("bad value\nsecond line")) == "bad value"
    assert first_line(ValueError("  \n padded \n")) == "padded"
    assert first_line(KeyError()) == "KeyError"  # no text: the type names the error


def test_the_engine_and_the_cli_define_it_once():
    folders = [Path(gradcam_batch.engine.__path__[0]), Path(gradcam_batch.cli.__path__[0])]
    found = [
        f"{path.relative_to(path.parents[1])}: {line.strip()}"
        for folder in folders
        for path in sorted(folder.rglob("*.py"))
        for line in path.read_text().splitlines()
        if re.match(r"\s*def _?first_line\w*\(", line)
    ]
    assert found == ["engine/errors.py: def first_line(exc: BaseException) -> str:"], found
