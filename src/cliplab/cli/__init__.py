"""`cliplab <command> --config X.yaml key=value ...` — one entry point for every stage.

Each command is one module here with ``add_parser(sub)`` (its arguments and ``--help``) and
``run(args) -> int``; `arguments` holds what they share. Bad input ends with a one-line
``cliplab: error: …`` and exit code 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from cliplab import __version__
from cliplab.cli import (adapt, convert, curate, data, evaluate, export, index, merge, pretrain,
                         quickstart, report, serve)
from cliplab.cli.arguments import EXIT_BAD_INPUT, GIVEN, CommandParser, under_torchrun
from cliplab.cli.config_owner import other_command_hint
from cliplab.cli.progress_bars import end_progress_bars
from cliplab.errors import CliplabError, ConfigError, show_warning_on_one_line

# each command's module, in the order `cliplab --help` lists them
COMMANDS: dict[str, ModuleType] = {
    "quickstart": quickstart, "data": data, "curate": curate, "pretrain": pretrain,
    "adapt": adapt, "merge": merge, "eval": evaluate, "report": report, "convert": convert,
    "export": export, "index": index, "serve": serve}
# the commands that share their work over torchrun's ranks; any other would run as N
# independent copies writing the same files
DISTRIBUTED_COMMANDS = ("pretrain",)
QUIET_RANK_WAIT_S = 10.0  # how long a rank that leaves its error to local rank 0 waits
LOG_BAR_INTERVAL_S = 30  # tqdm's TQDM_MININTERVAL where stderr is no terminal
# the system refusing a write: one line naming the file, not a traceback
WRITE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT,
                errno.EFBIG)


def build_parser() -> argparse.ArgumentParser:
    """The ``cliplab`` parser: one subcommand per module in `COMMANDS`."""
    parser = CommandParser(
        prog="cliplab",
        description="The life of a CLIP-style image-text model: curate data and write "
        "shards, pretrain (also under torchrun), adapt (few-shot heads, prompt learning, LoRA, "
        "fine-tuning), merge weights, evaluate and report, convert and export, index and serve "
        "search. `cliplab COMMAND --help` tells each command's options and config keys.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"cliplab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser,
                       argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments, with ``key=value`` overrides taken wherever they stand (argparse alone
    takes them only before the first option); anything else unknown is an error in the
    command's own usage."""
    args, rest = parser.parse_known_args(argv)
    vars(args).pop(GIVEN, None)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if not hasattr(args, "overrides"):
        unknown = rest
    if unknown:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        overrides += _overrides_taken_as_values(args)
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *overrides]
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


def _overrides_taken_as_values(args: argparse.Namespace) -> list[str]:
    """``key=value`` words a many-valued option (``--models A B``, ``--inputs ...``) swallowed
    because they followed it, taken back out of it (a path of that form that exists stays)."""
    taken = []
    for name in ("models", "inputs"):
        values = getattr(args, name, None)
        if isinstance(values, list):
            keep = [v for v in values if not _OVERRIDE.match(v) or Path(v).exists()]
            taken += [v for v in values if v not in keep]
            setattr(args, name, keep)
    return taken


def command_parser(parser: argparse.ArgumentParser,
                   args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser the arguments chose, e.g. ``cliplab data shard``'s."""
    while True:
        choices = next((a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, choices.dest, None) if choices is not None else None
        if chosen is None:
            return parser
        parser = choices.choices[chosen]


@contextlib.contextmanager
def _quiet_unless_first_rank() -> Iterator[None]:
    """Under torchrun, what every rank of a machine would print the same is printed by its
    first (local rank 0), as a recipe's errors are."""
    if not under_torchrun() or os.environ.get("LOCAL_RANK", "0") == "0":
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as devnull, \
            contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def _copies_under_torchrun(command: str, typed: str) -> str | None:
    """Why a command that does not distribute its work cannot run on several ranks (each
    would run it whole into the same folder); None when it may run. ``typed``: the command
    as typed (``data shard``)."""
    if command in DISTRIBUTED_COMMANDS or not under_torchrun():
        return None
    world = os.environ["WORLD_SIZE"]
    shared = ", ".join(DISTRIBUTED_COMMANDS)
    return (f"cliplab {typed} runs in one process, but torchrun launched WORLD_SIZE={world} "
            f"copies (each would run it whole into the same output); run it without torchrun "
            f"(only {shared} shares its work over ranks)")


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed: ``adapt``, ``data shard``."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cliplab`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # cliplab never reaches a hub unless asked
    # cliplab reports its own loads and progress; transformers' weight reports and shard bars
    # are noise in its command lines (a library user's own settings are left alone)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not _is_terminal(sys.stderr):  # a log file (CI): a bar's state every 30 s, not ten a second
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_BAR_INTERVAL_S))
    try:
        with _quiet_unless_first_rank():  # --help or a usage error: said once, not per rank
            args = parse_command_line(build_parser(), argv)
    except KeyboardInterrupt:  # during the first seconds' imports
        print("cliplab: interrupted", file=sys.stderr)
        return 130
    refusal = _copies_under_torchrun(args.command, _command_name(args))
    if refusal:
        if os.environ.get("RANK", "0") == "0":  # every rank's same line, said once
            print(f"cliplab: error: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with warnings.catch_warnings(), _sigterm_as_interruption(), _holding_outputs():
            from cliplab.data.images import hide_pils_unnamed_size_warning

            hide_pils_unnamed_size_warning()  # cliplab's own LargeImageWarning names the file
            if not args.debug:
                warnings.showwarning = show_warning_on_one_line
            return COMMANDS[args.command].run(args)
    except Terminated:
        end_progress_bars()
        if not _local_rank0_says_it(args):  # torchrun stops every rank: said once a machine
            print("cliplab: terminated", file=sys.stderr)
        return 143
    except CliplabError as err:
        end_progress_bars()
        if args.debug:  # the traceback, and still bad input's code (a script checks for 2)
            traceback.print_exc()
            return EXIT_BAD_INPUT
        hint = other_command_hint(_command_name(args), getattr(args, "config", None)) \
            if isinstance(err, ConfigError) else None
        who = ""
        if _local_rank0_says_it(args):
            # the ranks read the same files and command line: most errors are every rank's,
            # and local rank 0 says them once; torchrun stops this rank when that one exits.
            # A rank still here after the wait failed alone and says its own error.
            time.sleep(QUIET_RANK_WAIT_S)
            who = f"rank {os.environ.get('RANK', '?')}: "
        print(f"cliplab: error: {who}{hint or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        end_progress_bars()
        if not _local_rank0_says_it(args):  # Ctrl-C reaches every rank: said once a machine
            print("cliplab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # the reader of the output left (`| head`, a killed `tee`): the work is done, and
        # ends quietly as git's and coreutils' do (128 + SIGPIPE), not with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as raised:  # the system refused to write (read-only, full, no permission)
        err = _write_refusal(raised)
        if args.debug or err is None:
            raise
        end_progress_bars()
        print(f"cliplab: error: {_refused_write_line(err, args)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or no such method
        return False


def _stdout_gone() -> bool:
    """Whether standard output's reader has closed it (a pipe or socket with no reader polls
    as an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll
        return False


def _write_refusal(err: BaseException) -> OSError | None:
    """``err`` as the `OSError` of a refused write (`WRITE_ERRNOS`), or None: safetensors
    reports one as its own error type (``I/O error: No space left on device (os error 28)``),
    which reached the user as a traceback."""
    if type(err).__module__.startswith("safetensors"):
        from cliplab.file_modes import rust_os_error

        code = rust_os_error(err)
        # a full or read-only disk only: a permission error may be a read of an input's weights
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            err = OSError(code, os.strerror(code))
    return err if isinstance(err, OSError) and err.errno in WRITE_ERRNOS else None


def _refused_write_line(err: OSError, args: argparse.Namespace) -> str:
    """What the user reads of a refused write: the file (a writer that does not say which, a
    tar's or SQLite's: the --out it wrote), the system's words and what to do."""
    where = err.filename or getattr(args, "out", None)
    cache = getattr(args, "cache_dir", None)
    flag = "--cache-dir" if cache and err.filename and _lies_in(err.filename, cache) \
        else "--out"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        then = f"free space there or choose another {flag}"
    elif err.errno == errno.EFBIG:
        then = (f"the file system or `ulimit -f` takes no file that large (FAT32 stops at "
                f"4 GB); choose another {flag}")
    else:
        then = f"choose another {flag}"
    return f"{f'{where}: ' if where else ''}{err.strerror or err}; {then}"


def _lies_in(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    here, there = Path(path).expanduser().absolute(), Path(folder).expanduser().absolute()
    return here == there or there in here.parents


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop): unwound as Ctrl-C is, so a half-built
    output is removed and a run records where it stopped."""


@contextlib.contextmanager
def _sigterm_as_interruption() -> Iterator[None]:
    """Within it, SIGTERM raises `Terminated` (in the main thread). Under torchrun too: its
    agent passes a scheduler's stop on to every rank as SIGTERM, and each unwinds as from
    Ctrl-C, so rank 0 says how to resume; a rank still running after the agent's grace
    period is killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
        raise Terminated

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _holding_outputs():
    """The outputs the command checks held while it runs (`holding_outputs`)."""
    from cliplab.output_lock import holding_outputs  # imports torch: not for --help

    return holding_outputs()


def _local_rank0_says_it(args: argparse.Namespace) -> bool:
    """Whether this process is a rank of a distributed command under torchrun other than its
    machine's local rank 0, which says what every rank of the machine would."""
    return args.command in DISTRIBUTED_COMMANDS and under_torchrun() and \
        os.environ.get("LOCAL_RANK", "0") != "0"


if __name__ == "__main__":
    sys.exit(main())
