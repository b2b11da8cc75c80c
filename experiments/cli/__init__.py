"""The ``uniprobe`` command: thin handlers (parse → one library call → print), one module per group.

    uniprobe points | capture | inspect | demo     (uniprobe.experiments.cli.store)
    uniprobe probe | lens                          (uniprobe.experiments.cli.probe)
    uniprobe patch                                 (uniprobe.experiments.cli.patch)
    uniprobe steer                                 (uniprobe.experiments.cli.steer)
    uniprobe attention | knockout                  (uniprobe.experiments.cli.attention)
    uniprobe train-sandbox | gap | sandbox seeds   (uniprobe.experiments.cli.sandbox)
    uniprobe seeds                                 (uniprobe.experiments.cli.seeds)
    uniprobe sweep                                 (uniprobe.experiments.cli.sweep)

Errors: the toolkit's own (:class:`uniprobe.hooks.errors.UniprobeError`) and the operating system's
about a user's paths (missing file, existing folder, no permission, disk full) print one line
``uniprobe CMD: error: ...`` and exit with status 2; inputs are checked before anything is written.
Anything else is a bug in uniprobe: it prints ``internal error`` with the traceback and exits with
status 70. Set ``UNIPROBE_DEBUG=1`` to see the full traceback of a user error too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Sequence

from uniprobe.hooks.errors import UniprobeError

# OS errors about paths a user named: said in one line, not as a bug
USER_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)
# library messages name keyword arguments; on the command line they are flags
_FLAG_SPELLING = {"resume=True": "--resume", "overwrite=True": "--overwrite"}
# the commands that keep finished work when interrupted (every other one starts over)
_ON_INTERRUPT = {
    "capture": "finished shards are kept; add --resume to the same command to continue",
    "sweep": "finished runs are kept; run the same command again to continue",
    "demo": "finished sections are kept; run the same command (same --out) again to continue",
}


def _version() -> str:
    import uniprobe

    return f"uniprobe {uniprobe.__version__}"


def build_parser() -> argparse.ArgumentParser:
    from uniprobe.experiments.cli import attention, patch, probe, sandbox, seeds, steer, store, sweep

    parser = argparse.ArgumentParser(prog="uniprobe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    store.add_parsers(sub)
    probe.add_probe_parser(sub)
    probe.add_lens_parser(sub)
    patch.add_patch_parser(sub)
    steer.add_steer_parser(sub)
    attention.add_attention_parser(sub)
    attention.add_knockout_parser(sub)
    sandbox.add_train_parser(sub)
    sandbox.add_gap_parser(sub)
    sandbox.add_sandbox_parser(sub)
    seeds.add_seeds_parser(sub)
    sweep.add_sweep_parser(sub)
    return parser


def on_interrupt(command: str) -> str:
    """What an interrupted ``command`` kept on disk and how to continue (the Ctrl-C message)."""
    return _ON_INTERRUPT.get(command, "nothing was kept; running the command again starts it over")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is about the user's input (one line) rather than a bug (a traceback)."""
    return isinstance(err, (UniprobeError, *USER_OS_ERRORS)) or (
        isinstance(err, OSError) and err.errno is not None and err.filename is not None
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"uniprobe {args.command}: interrupted; {on_interrupt(args.command)}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every exception ends here, as a user error or a bug
        if not is_user_error(err):
            print(
                f"uniprobe {args.command}: internal error (a bug in uniprobe, please report it):",
                file=sys.stderr,
            )
            traceback.print_exception(err, file=sys.stderr)
            return EXIT_INTERNAL_ERROR
        if os.environ.get("UNIPROBE_DEBUG"):
            raise
        print(f"uniprobe {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes ``str`` adds), with the
    library's keyword spellings (``resume=True``) turned into the command's flags (``--resume``)."""
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    text = re.sub(r"\s*\n\s*", " ", str(msg)).strip()
    for keyword, flag in _FLAG_SPELLING.items():
        if flag not in text:  # a message that already names the flag keeps its wording
            text = text.replace(keyword, flag)
    return text


if __name__ == "__main__":
    sys.exit(main())
