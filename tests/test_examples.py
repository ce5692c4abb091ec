"""The examples run: both notebooks execute top to bottom (nbclient) and the quickstart script exits cleanly.

The notebooks are executed in memory; the copies in ``examples/`` keep the outputs saved when they were
last refreshed. To refresh them (e.g. after the default bundle changes), run::

    R2R_WRITE_NOTEBOOKS=1 python -m pytest tests/test_examples.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CELL_TIMEOUT_S = 600


def _execute(name: str):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = EXAMPLES / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any failure
    if os.environ.get("R2R_WRITE_NOTEBOOKS") == "1":
        nbformat.write(nb, path)
    return nb


def _stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )


@pytest.mark.slow
def test_llamaindex_notebook_executes():
    pytest.importorskip("llama_index.llms.huggingface")
    text = _stdout(_execute("llamaindex_query_engine.ipynb"))
    assert "12 documents indexed" in text
    answer = text.split("\nA: ", 1)[1].split("\n", 1)[0]
    assert answer.strip(), "the generator produced an empty answer"
    assert "3 concurrent queries" in text


@pytest.mark.slow
def test_langchain_notebook_executes():
    pytest.importorskip("langchain_classic")
    pytest.importorskip("langchain_huggingface")
    text = _stdout(_execute("langchain_compression.ipynb"))
    assert "12 documents indexed" in text
    answer = text.split("\nA: ", 1)[1].split("\n", 1)[0]
    assert answer.strip(), "the generator produced an empty answer"
    assert "3 concurrent queries" in text


@pytest.mark.slow
def test_quickstart_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("query: ")
    assert "route: " in proc.stdout and "llamaindex" in proc.stdout and "langchain" in proc.stdout


@pytest.mark.slow
def test_training_notebook_executes():
    data = EXAMPLES.parent.parent / "shared" / "data" / "financial" / "tatqa"
    if not data.is_dir():
        pytest.skip(f"the shared data is not beside the repository ({data})")
    text = _stdout(_execute("train_domain_experts.ipynb"))
    assert "groups of 4" in text
    assert "dev nDCG@10: first-stage" in text and "expert" in text
