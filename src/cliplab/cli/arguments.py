"""What the commands share: their common arguments, reading a stage's config, and the
checks of an output folder against the inputs."""

from __future__ import annotations

import argparse
import contextlib
import os
import textwrap
from collections.abc import Iterator

EXIT_BAD_INPUT = 2
# what a --model takes (export's MODEL: all but an ONNX export, which is its output)
TORCH_MODEL_SPECS = ("preset name, model folder, checkpoint folder, run folder (its newest "
                     "checkpoint), Hugging Face Hub id or OpenCLIP checkpoint")
MODEL_SPECS = TORCH_MODEL_SPECS.replace(" or OpenCLIP", ", OpenCLIP") + " or ONNX export"



def under_torchrun() -> bool:
    """Whether torchrun launched several copies of this command (``WORLD_SIZE`` above 1; read
    here, not through train.distributed, which imports torch)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")

GIVEN = "_options_given"  # the namespace's record of the options given (dropped after parsing)


class GivenOnce(argparse._StoreAction):
    """A plain option given twice with two values (under any of its names) is refused: argparse
    keeps the last, so ``--out a --out b`` silently wrote only b. The same value twice is one."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = vars(namespace).setdefault(GIVEN, {})
        if self.dest in given and given[self.dest] != values:
            def shown(v):
                return " ".join(map(str, v)) if isinstance(v, list) else v
            parser.error(f"{'/'.join(self.option_strings)} given twice "
                         f"({shown(given[self.dest])} and {shown(values)}); give one")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class WholeWordsHelp(argparse.HelpFormatter):
    """argparse's help, wrapped between words only: its wrapper broke names at hyphens
    (``task-`` / ``arithmetic``, which copied from the first line is no method)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(self._whitespace_matcher.sub(" ", text).strip(), width,
                             initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class CommandParser(argparse.ArgumentParser):
    """cliplab's parsers (its subcommands' too): help wrapped between words, and every plain
    option `GivenOnce`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", WholeWordsHelp)
        super().__init__(*args, **kwargs)
        self.register("action", None, GivenOnce)
        self.register("action", "store", GivenOnce)


def add_common(p: argparse.ArgumentParser, example: str, config_required: bool = False) -> None:
    """``--config YAML``, ``key=value`` overrides (``example`` shows some) and ``--no-progress``."""
    p.add_argument("--config", required=config_required, metavar="YAML",
                   help="YAML recipe (copy one from configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"override config keys (anywhere on the line), e.g. {example}")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_debug(p: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (``cliplab eval ... --debug``)."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")


def add_stage_arguments(p: argparse.ArgumentParser, out_help: str, example: str,
                        config_required: bool = False) -> None:
    """The arguments every stage command takes: ``--config YAML``, ``key=value`` overrides
    (``example`` shows some in ``--help``), ``--out DIR``, ``--no-progress`` and ``--debug``."""
    add_common(p, example, config_required)
    p.add_argument("--out", metavar="DIR", help=out_help,
                   type=os.path.expanduser)
    add_debug(p)


DEVICE_HELP = "where the model runs: cpu, cuda, cuda:N, mps or auto (a GPU when there is one)"


def device_name(value: str) -> str:
    """``--device`` checked when the command line is read (argparse names it on an error)."""
    from cliplab.models.device import resolve_device

    try:
        resolve_device(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_device(p: argparse.ArgumentParser, in_config: bool = True, key: str = "device") -> None:
    """``--device``: the stage config's ``key`` (``in_config``; pretrain's is ``train.device``),
    else the command's own option (default auto)."""
    p.add_argument("--device", type=device_name, default=None if in_config else "auto",
                   help=DEVICE_HELP + (f"; default: the config's '{key}', else auto"
                                       if in_config else "; default auto"))


def train_options(args: argparse.Namespace) -> dict | None:
    """The ``train`` keys set by the options of pretrain and quickstart (``--device``:
    ``train.device``), None when none is given."""
    return {"device": args.device} if args.device is not None else None


def add_data_argument(p: argparse.ArgumentParser, *aliases: str) -> None:
    """``--data SOURCE``: the collection a command reads, replacing the config's ``data``."""
    p.add_argument("--data", *aliases, dest="data", metavar="SOURCE",
                   help="built-in source (shapes, digits, fashion-mnist, ...), a manifest "
                   "(.csv/.jsonl/.parquet), a shard folder or an image folder; replaces the "
                   "config's data (data.KEY=VALUE overrides then set its options)")


def data_spec(args: argparse.Namespace) -> dict | None:
    """The ``{source: ...}`` spec of ``--data``, None when it is not given."""
    from cliplab.data.collection import source_spec

    return source_spec(args.data) if getattr(args, "data", None) is not None else None


def stage_config(schema, args: argparse.Namespace, writes: str | None = None, **extra):
    """The command's validated config (a `cliplab.config.Section`): the ``--config`` file,
    then the command's own options (``extra``, unset ones skipped, ``--out``, and ``--data``,
    which replaces the file's data spec), then the ``key=value`` overrides; errors name the
    file and the key path. ``writes``: what the command writes, when it needs an ``out``
    (`out_required`)."""
    from cliplab.config import load_config

    return load_config(schema, args.config, args.overrides, extra={**extra, "out": args.out},
                       replace={"data": data_spec(args)}, required=out_required(writes))


def out_required(writes: str | None) -> dict[str, str]:
    """`load_config`'s ``required`` of a command that writes ``writes`` (``the merged model``):
    an ``out`` that --out, an ``out=`` override and the config file leave absent or blank is
    said in `missing_out`'s one wording, alone or among the config's other problems; {} for a
    command that needs none (``writes`` None)."""
    from cliplab.output_folder import missing_out

    return {"out": str(missing_out(writes))} if writes else {}


def config_where(args: argparse.Namespace) -> str:
    """How errors found after loading name the config (as `load_config` does)."""
    from cliplab.config import config_source

    return config_source(args.config, bool(getattr(args, "overrides", None)))


def check_out_is_not_input(out: str | None, inputs: list) -> None:
    """The file and input checks of `check_out` alone, for curate and index (which keep their
    own logic for an existing folder)."""
    from cliplab.output_folder import check_out

    if out:
        check_out(out, "", inputs, may_exist=True, previous=lambda folder: True)


def given_by(args: argparse.Namespace, option: str, key: str) -> str:
    """Where a value the command line's ``option`` or the config's ``key`` may set came from,
    as errors name it: ``--model``, else the key in the config (``x.yaml: model``)."""
    dest = option.removeprefix("--").replace("-", "_")
    return option if getattr(args, dest, None) is not None else f"{config_where(args)}: {key}"


@contextlib.contextmanager
def naming_models(sources: dict[str, str]) -> Iterator[None]:
    """Within it, an unknown model's error names where its name was given: ``sources`` maps
    each model name to its option or config key (`given_by`); other names' errors pass as
    they are."""
    from cliplab.errors import UnknownModelError

    try:
        yield
    except UnknownModelError as err:
        if err.name not in sources:
            raise
        # the traceback --debug shows is the original one, from where the name was looked up
        raise err.at(sources[err.name]).with_traceback(err.__traceback__) from None


def show_required(p: argparse.ArgumentParser, action: argparse.Action) -> None:
    """Show ``action`` (an option the command checks itself, as `require_out` does ``--out``,
    so a missing one is said in cliplab's wording, not argparse's) as required in ``p``'s
    usage; call it once every argument of ``p`` is added."""
    action.required = True
    usage = p.format_usage().removeprefix("usage: ").strip()
    action.required = False
    p.usage = usage.replace("%", "%%")  # argparse fills in %(prog)s


def require_out(args: argparse.Namespace, what: str) -> None:
    """`missing_out` before any work when ``--out`` is not given or blank, for a command
    without a config (export, convert; a stage's config checks its ``out`` with its other
    keys, `out_required`); ``what`` is what the command writes."""
    from cliplab.output_folder import missing_out

    if not (args.out or "").strip():
        raise missing_out(what)
