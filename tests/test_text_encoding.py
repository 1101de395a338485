"""Text files are UTF-8 whatever the platform's locale (Windows' default is a code page such as
cp1252): every text read and write in cliplab names its encoding."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cliplab"
NOT_TEXT_FILES = {"Image", "tarfile", "os", "zipfile"}  # their .open() is binary or a descriptor


def _text_io_without_encoding(tree: ast.AST):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        owner = getattr(func.value, "id", None) if isinstance(func, ast.Attribute) else None
        if owner in NOT_TEXT_FILES and name == "open":
            continue
        if name in ("read_text", "write_text"):
            yield node
        elif name in ("open", "fdopen"):
            at = 1 if isinstance(func, ast.Name) or name == "fdopen" else 0  # Path.open(mode)
            mode = next((k.value.value for k in node.keywords if k.arg == "mode"), None)
            if mode is None and len(node.args) > at and isinstance(node.args[at], ast.Constant):
                mode = node.args[at].value
            if not (isinstance(mode, str) and "b" in mode):
                yield node


def test_every_text_read_and_write_names_its_encoding():
    found = [f"{path.relative_to(SRC)}:{node.lineno}"
             for path in sorted(SRC.rglob("*.py"))
             for node in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, f"text I/O without encoding= (the locale's would be used): {found}"


def test_the_checker_sees_each_kind_of_text_io():
    code = ("p.read_text()\np.write_text(s)\nopen(f)\nopen(f, 'w')\np.open('a')\n"
            "os.fdopen(fd, 'r+')\nopen(f, 'rb')\np.open('wb')\nImage.open(f)\n"
            "p.read_text(encoding='utf-8')\n")
    assert [n.lineno for n in _text_io_without_encoding(ast.parse(code))] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows does not read LC_ALL")
def test_openclip_tokenizer_and_non_ascii_config_work_under_an_ascii_locale(tmp_path):
    """Under the C locale without UTF-8 mode, Python's default text encoding is ASCII: CLIP's
    BPE merges and a config with 'λ' were written and read with it (UnicodeError)."""
    config = tmp_path / "c.yaml"
    config.write_text("note: λ chosen on validation\n", encoding="utf-8")
    script = tmp_path / "check.py"  # a file: a -c argument would be decoded as ASCII too
    script.write_text(
        "import codecs, locale\n"
        "assert codecs.lookup(locale.getpreferredencoding(False)).name == 'ascii'\n"
        "from cliplab.config import load_yaml\n"
        "from cliplab.models.convert.clip_bpe import clip_bpe_tokenizer\n"
        "tok = clip_bpe_tokenizer()\n"
        "assert tok.decode(tok('café')['input_ids'], skip_special_tokens=True) == 'café'\n"
        f"assert load_yaml({str(config)!r})['note'].startswith('λ')\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          encoding="utf-8", env=env)
    assert done.returncode == 0, done.stderr
