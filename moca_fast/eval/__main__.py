"""python -m moca_fast.eval {knn,linear,lowshot,finetune} [flags]  (each: --help)."""
from __future__ import annotations

import importlib
import sys

from moca_fast.subcommands import choose

PROTOCOLS = {"knn": "k-NN sweep", "linear": "linear probe", "lowshot": "low-shot logistic regression",
             "finetune": "full fine-tuning"}


def main(argv: list[str] | None = None) -> int:
    from moca_fast.entry import run_main  # stops are handled and errors are one line from here

    return run_main(lambda end: _main(sys.argv[1:] if argv is None else argv), known=lambda error: None)


def _main(argv: list[str]) -> int:
    protocol = choose(argv, __doc__, PROTOCOLS, "protocol")
    if isinstance(protocol, int):
        return protocol
    module = importlib.import_module(f"moca_fast.eval.{protocol}")
    if protocol == "knn":
        return module.main(argv[1:], prog="python -m moca_fast.eval knn")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
