"""The command-line pieces the benchmark scripts share (stdlib only, so ``--help`` and a bad
value answer at once, and the OpenCLIP environment's scripts can use them too).

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # as the scripts do
    from cli_args import make_parser, positive_int

    parser = make_parser(__doc__)       # description: the docstring's first paragraph
    parser.add_argument("--n", type=positive_int, default=1000, help="rows")

Argument types raise ``argparse.ArgumentTypeError``, so a bad value is a one-line usage error
(exit 2) instead of a traceback from deep inside a run. What only cliplab can check (a config
key, a missing dataset) and a missing optional package still reach the script's ``main``:

    if __name__ == "__main__":
        run_main(main)                  # SCRIPT: error: ... and exit 2, not a traceback
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

# optional packages (not installed by cliplab's base install) a benchmark may import, and how
# to install each: a missing one is a one-line error naming this, not a traceback
OPTIONAL = {
    "faiss": "pip install 'cliplab[serve]' (or 'cliplab[curate]'; both bring faiss-cpu)",
    "httpx": "pip install 'cliplab[serve]'",
    "fastapi": "pip install 'cliplab[serve]'",
    "uvicorn": "pip install 'cliplab[serve]'",
    "onnx": "pip install 'cliplab[onnx]'",
    "onnxruntime": "pip install 'cliplab[onnx]'",
    "onnxscript": "pip install 'cliplab[onnx]'",
    "imagehash": "pip install 'cliplab[curate]'",
    "langid": "pip install 'cliplab[curate]'",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (the docstring's line breaks), each flag's default after its
    help; a default of None, False or [] (unset, a switch) is left out: the help says what it
    means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or action.required:
            return action.help
        if isinstance(default, int) and not isinstance(default, bool) and default >= 10_000:
            return f"{action.help} (default: {default:,})"  # 1,000,000, not 1000000
        return super()._get_help_string(action)


def make_parser(doc: str, paragraphs: int = 1, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first ``paragraphs`` paragraphs of ``doc`` (a
    script's docstring), whole, and whose help shows every flag's default."""
    description = "\n\n".join(doc.strip().split("\n\n")[:paragraphs])
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                   **kwargs)


def _number(text: str, kind: type, test, rule: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not test(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count, a size)."""
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a seed; a count where 0 means none or all)."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A number > 0 (seconds, epochs, a learning rate)."""
    return _number(text, float, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """A number >= 0 (a noise scale, where 0 means none)."""
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """A number in (0, 1] (a target recall, a distance threshold)."""
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    path = Path(text).expanduser()
    if not path.is_dir():
        why = "is not a folder" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {why}")
    return path


def check_seeds(parser: argparse.ArgumentParser, seeds: list[int], minimum: int = 3,
                flag: str = "--seeds") -> None:
    """A usage error (exit 2) unless ``seeds`` holds ``minimum`` or more seeds, none twice: a
    "mean gap > 2 x pooled std over seeds" verdict needs a spread, and one seed (or one seed
    repeated) has none, so every positive gap would pass."""
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        parser.error(f"argument {flag}: seed {', '.join(map(str, twice))} given more than once "
                     "(a repeated seed repeats the same run and shrinks the spread)")
    if len(seeds) < minimum:
        parser.error(f"argument {flag}: needs at least {minimum} different seeds (the verdict "
                     f"compares a gap with 2 x the pooled std over seeds), got {len(seeds)}")


def check_model(parser: argparse.ArgumentParser, flag: str, spec: str,
                presets: bool = True) -> None:
    """A usage error (exit 2) unless the model ``spec`` names a model: a preset (unless not
    ``presets``: a script that needs the model's folder), a model, checkpoint or run folder, or
    a Hugging Face Hub id (cliplab's resolver decides; a Hub id not cached is fetched unless
    ``HF_HUB_OFFLINE``). Call it right after parsing, before any heavy work."""
    path = Path(spec).expanduser()
    written_as_path = path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1
    if written_as_path and not path.exists():  # said without the seconds of importing cliplab
        parser.error(f"argument {flag}: {spec} does not exist (no such file or folder)")
    from cliplab.errors import ModelError
    from cliplab.models.resolve import PRESETS, resolve_model_path

    if presets and spec in PRESETS:
        return
    try:
        resolve_model_path(spec)  # a folder's kind is checked, nothing is loaded
    except ModelError as err:
        parser.error(f"argument {flag}: {err}")


def missing_package(err: ImportError) -> str | None:
    """The one-line message for ``err`` if it is an optional package (`OPTIONAL`) that is not
    installed, else None (any other import error is a bug: its traceback is kept)."""
    name = (getattr(err, "name", None) or "").partition(".")[0]
    if name not in OPTIONAL or not isinstance(err, ModuleNotFoundError):
        return None  # installed, but failing to import: its traceback says why
    return f"this benchmark needs {name}, which is not installed: {OPTIONAL[name]}"


def require(parser: argparse.ArgumentParser, *modules: str) -> None:
    """A usage error (exit 2) unless every one of ``modules`` (optional packages a run will
    import, see `OPTIONAL`) imports: said right after parsing, not after minutes of set-up."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            said = missing_package(err)
            if said is None:
                raise
            parser.error(said)


def run_main(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a script's ``main()``: a cliplab error (`cliplab.errors.CliplabError`: bad input
    only cliplab checks, a missing dataset or file) or a missing optional package (`OPTIONAL`)
    ends in one line, ``SCRIPT: error: ...``, and exit code 2, as ``python -m cliplab`` does,
    instead of a traceback. Any other exception keeps its traceback (that is a bug)."""
    prog = prog or Path(sys.argv[0]).name
    try:
        main()
    except ImportError as err:
        said = missing_package(err)
        if said is None:
            raise
        print(f"{prog}: error: {said}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        errors = sys.modules.get("cliplab.errors")  # not imported: not one of cliplab's
        if errors is None or not isinstance(err, errors.CliplabError):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(f"{Path(__file__).name} is a helper module the benchmark scripts import, not a "
             "script: run one of the others in benchmarks/ (each has --help)")
