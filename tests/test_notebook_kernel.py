"""Progress bars in a real Jupyter kernel: a notebook cell trains, and what the kernel sends
back is widget views (``tqdm.auto`` picked tqdm's notebook bars), not text bars.

The notebook runs through ``nbclient`` in a fresh ``ipykernel`` process, as JupyterLab or VS
Code would run it; nothing is patched.
"""

from __future__ import annotations

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

WIDGET = "application/vnd.jupyter.widget-view+json"

CELL = """
from zae_trainer.display import in_notebook
from zae_trainer.testing import TinyRegressionTrainer, tiny_loader, tiny_trainer
print("in_notebook", in_notebook())
trainer = tiny_trainer(TinyRegressionTrainer, log_bar=True)
trainer.run(2, tiny_loader())
print("steps", trainer.progress_checker.step)
"""


@pytest.mark.slow
def test_a_notebook_cell_shows_widget_progress_bars_and_trains(tmp_path) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL)])
    client = nbclient.NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = notebook.cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    widgets = [o for o in outputs if o.get("output_type") == "display_data" and WIDGET in o.get("data", {})]
    assert "in_notebook True" in text
    assert "steps 12" in text  # 2 epochs of tiny_loader's 6 batches
    assert len(widgets) >= 2, outputs  # the epoch bar and at least one batch bar, as widgets
    assert "it/s]" not in text and "\r" not in text  # no text bars written to the cell's stream
