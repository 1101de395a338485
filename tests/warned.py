"""What cliplab warned of, for tests: its warnings are `CliplabWarning`s (the command line
prints each as one ``cliplab: warning: ...`` line)."""

from __future__ import annotations

import pytest

from cliplab.errors import CliplabWarning


def warned(recwarn: pytest.WarningsRecorder) -> str:
    """The `CliplabWarning`s given since the last call, one message a line (as a command line
    prints them, without its prefix); other libraries' warnings are left out."""
    text = "".join(f"{w.message}\n" for w in recwarn.list if issubclass(w.category, CliplabWarning))
    recwarn.clear()
    return text
