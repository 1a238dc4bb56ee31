"""What a person watching sees, on real pseudo-terminals: bars when the terminal has a size,
one line per epoch when it reports none (tqdm would draw nothing there)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
from typing import IO

import pytest

from zae_trainer.display import ProgressDisplay, in_notebook

from core_helpers import tiny_loader, tiny_trainer


def _terminal(rows: int, columns: int) -> tuple[int, IO[str]]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, os.fdopen(slave, "w", buffering=1)


def _read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the slave side is closed and everything was read
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def _train_on(rows: int, columns: int, monkeypatch: pytest.MonkeyPatch) -> str:
    master, stream = _terminal(rows, columns)
    monkeypatch.setattr(sys, "stderr", stream)
    trainer = tiny_trainer(log_bar=True)
    trainer.run(2, tiny_loader(n=16), tiny_loader(n=8))
    stream.close()
    return _read_all(master)


@pytest.mark.parametrize(("rows", "columns"), [(0, 0), (24, 0), (0, 80)])
def test_a_terminal_without_a_size_gets_one_line_per_epoch(
    rows: int, columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _train_on(rows, columns, monkeypatch)
    lines = [line for line in out.replace("\r", "").split("\n") if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], out
    assert "train/loss" in lines[0] and "valid/loss" in lines[0]
    assert "run finished: 2 epoch(s)" in out


def test_a_terminal_with_a_size_gets_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _train_on(24, 100, monkeypatch)
    assert "epoch: 100%" in out and "2/2 [" in out, out  # the epoch bar, finished
    assert "\nepoch 1/2 " not in out.replace("\r", "\n")  # no per-epoch lines besides the bars
    assert "run finished: 2 epoch(s)" in out


def test_a_plain_interpreter_or_terminal_ipython_is_not_a_notebook() -> None:
    assert in_notebook() is False
    shell = pytest.importorskip("IPython.terminal.interactiveshell").TerminalInteractiveShell.instance()
    try:
        assert in_notebook() is False  # an IPython shell, but not a Jupyter kernel
        assert ProgressDisplay(True).notebook is False
    finally:
        type(shell).clear_instance()
