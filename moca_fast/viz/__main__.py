"""python -m moca_fast.viz {pca,codes,masks,curves,neighbors} [flags]  (each: --help). Each writes one PNG."""
from moca_fast.viz import interrupt

if __name__ == "__main__":
    interrupt.install()  # before torch and matplotlib load: a signal from here on ends with one line

import importlib  # noqa: E402
import sys  # noqa: E402

from moca_fast.subcommands import choose  # noqa: E402

FIGURES = {"pca": "the teacher's patch tokens, first three PCA components as RGB",
           "codes": "the codebook word the teacher assigns each patch, its entropy, the most used words",
           "masks": "the two masking rounds of a training step: encoder-visible tokens, decoder positions",
           "curves": "losses, lr and k-NN of one or more runs (metrics.jsonl)",
           "neighbors": "nearest training images of query images by the teacher's features"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    figure = choose(argv, __doc__, FIGURES, "figure")
    if isinstance(figure, int):
        return figure
    try:
        module = importlib.import_module(f"moca_fast.viz.{figure}")
    except interrupt.Interrupted as e:
        print(f"stopped by {e}: no figure written", file=sys.stderr)
        return e.exit_status
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
