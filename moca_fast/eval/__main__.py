"""python -m moca_fast.eval {knn,linear,lowshot,finetune} [flags]  (each: --help)."""
from __future__ import annotations

import importlib
import sys

PROTOCOLS = {"knn": "k-NN sweep", "linear": "linear probe", "lowshot": "low-shot logistic regression",
             "finetune": "full fine-tuning"}


def main(argv: list[str] | None = None) -> int:
    from moca_fast.entry import run_main  # stops are handled and errors are one line from here

    return run_main(lambda end: _main(sys.argv[1:] if argv is None else argv), known=lambda error: None)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n" + "\n".join(f"  {name:9s} {what}" for name, what in PROTOCOLS.items()))
        return 0 if argv else 2
    if argv[0] not in PROTOCOLS:
        print(f"error: unknown protocol {argv[0]!r}; choose one of {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"moca_fast.eval.{argv[0]}")
    if argv[0] == "knn":
        return module.main(argv[1:], prog="python -m moca_fast.eval knn")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
