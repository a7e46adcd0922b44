"""The first word of `python -m moca_fast.eval ...` / `python -m moca_fast.viz ...`: which command runs.
Imports nothing heavy: stop handling starts before torch loads."""
from __future__ import annotations

import importlib
import sys

EXIT_BAD_INPUT = 2


def choose(argv: list[str], usage: str, commands: dict[str, str], noun: str) -> str | int:
    """argv[0] when it is one of `commands` (name -> what it does); else the exit status after printing the
    usage and the list (no argument: 2, -h / --help: 0) or one `error:` line (an unknown name: 2)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage.strip() + "\n" + "\n".join(f"  {name:10s} {what}" for name, what in commands.items()))
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in commands:
        print(f"error: unknown {noun} {argv[0]!r}; choose one of {', '.join(commands)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return argv[0]


def dispatch(package: str, argv: list[str], usage: str, commands: dict[str, str], noun: str) -> int:
    """`python -m <package> <command> [flags]`: runs <package>.<command>.main(flags), with stops handled and
    every error one line from here (moca_fast.entry)."""
    from moca_fast.entry import run_main

    def body(end) -> int:
        command = choose(argv, usage, commands, noun)
        if isinstance(command, int):
            return command
        return importlib.import_module(f"{package}.{command}").main(argv[1:])

    return run_main(body, known=lambda error: None)
