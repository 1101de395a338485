"""Checks of what a command left behind: a folder's files, and the one-line error it printed."""

from __future__ import annotations

from pathlib import Path


def folder_tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to check a folder survived unchanged)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys) -> str:
    """The error a command printed on stderr, checked to be one ``cliplab: error:`` line."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cliplab: error: "), err
    return err.removeprefix("cliplab: error: ")
