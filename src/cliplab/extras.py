"""Whether an optional package (an extra's) is installed, found without importing it: a missing
one is refused in one line naming its extra before any work, and Ray alone takes seconds to
import."""

from __future__ import annotations

import importlib.util
import sys


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (one imported already counts, whatever its spec)."""
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing; a module whose __spec__ is None
        return False
