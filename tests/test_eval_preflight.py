"""`run_suite` reads and checks every task's data before the first task encodes anything, so a
mistake in the last task (an unknown class, a missing file) costs no encoding first."""

import pytest

from cliplab.errors import CliplabError, ConfigError
from cliplab.evaluate.suite import run_suite
from cliplab.evaluate.tasks import TaskContext

DIGITS = {"source": "digits", "split": "test"}


def test_a_bad_class_of_the_last_task_is_refused_before_any_encoding(tiny_model, tmp_path,
                                                                      monkeypatch):
    encoded = []
    real = type(tiny_model).preprocess  # every image encoding starts here
    monkeypatch.setattr(type(tiny_model), "preprocess",
                        lambda self, *a, **k: encoded.append(1) or real(self, *a, **k))
    good = {"name": "all", "task": "zeroshot", "data": DIGITS}
    bad = {"name": "two", "task": "zeroshot", "data": DIGITS, "classes": ["one", "twelve"]}
    with pytest.raises(ConfigError, match=r"^tasks\[1\] \(name 'two'\): classes: unknown "
                                          r"class 'twelve'"):
        run_suite(tiny_model, {"tasks": [good, bad]}, TaskContext(progress=False))
    missing = {"name": "gone", "task": "zeroshot",
               "data": {"source": "image-folder", "path": str(tmp_path / "nope")}}
    with pytest.raises(CliplabError, match="nope does not exist"):
        run_suite(tiny_model, {"tasks": [good, missing]}, TaskContext(progress=False))
    assert not encoded
    results = run_suite(tiny_model, {"tasks": [good, {**bad, "classes": ["one", "two"]}]},
                        TaskContext(progress=False))
    assert encoded and set(results) == {"all", "two"}  # a good suite still runs
