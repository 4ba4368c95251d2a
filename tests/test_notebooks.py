"""The exploration notebooks (notebooks/*.ipynb) are stored without outputs: a committed output or
execution count fails here. Executing them is nbmake's job (`pytest --nbmake notebooks/`), not this file's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_knowledge_dynamics", "02_attention", "03_token_count", "04_sd_pixel_knowledge", "05_removed_or_hidden"}


def stored_problems(nb: dict) -> list[str]:
    """What is stored that should not be: outputs and execution counts of code cells."""
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has {len(cell['outputs'])} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell['execution_count']}")
    return problems


def test_every_notebook_is_there():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # a valid notebook, not just JSON
    problems = stored_problems(json.loads(path.read_text()))
    assert not problems, (f"{path.name}: {'; '.join(problems)}. Clear the outputs before committing: "
                          f"jupyter nbconvert --clear-output --inplace {path}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_intro_and_code(path):
    """Each notebook opens with a markdown intro stating its question and runs code."""
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown" and "**Question.**" in "".join(cells[0]["source"])
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "tempfile" in code, "runs go to a temporary directory, never into the repository"


def test_the_check_catches_outputs():
    """A notebook with an executed cell is reported (so the check above would fail on one)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    assert stored_problems(json.loads(nbformat.writes(nb))) == []
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[0].execution_count = 1
    assert stored_problems(json.loads(nbformat.writes(nb))) == ["cell 0 has 1 output(s)", "cell 0 has execution_count 1"]
