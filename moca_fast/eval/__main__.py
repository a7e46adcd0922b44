"""python -m moca_fast.eval {knn,linear,lowshot,finetune,segment} [flags]  (each: --help)."""
from __future__ import annotations

import sys

from moca_fast.subcommands import dispatch

PROTOCOLS = {"knn": "k-NN sweep", "linear": "linear probe", "lowshot": "low-shot logistic regression",
             "finetune": "full fine-tuning", "segment": "semantic segmentation probes (linear, fine-tuned, low-shot)"}


def main(argv: list[str] | None = None) -> int:
    return dispatch("moca_fast.eval", sys.argv[1:] if argv is None else argv, __doc__, PROTOCOLS, "protocol")


if __name__ == "__main__":
    sys.exit(main())
