"""python -m moca_fast.viz {pca,codes,masks,curves,neighbors} [flags]  (each: --help). Each writes one PNG."""
import importlib
import sys

from moca_fast.subcommands import choose

FIGURES = {"pca": "the teacher's patch tokens, first three PCA components as RGB",
           "codes": "the codebook word the teacher assigns each patch, its entropy, the most used words",
           "masks": "the two masking rounds of a training step: encoder-visible tokens, decoder positions",
           "curves": "losses, lr and k-NN of one or more runs (metrics.jsonl)",
           "neighbors": "nearest training images of query images by the teacher's features"}


def main(argv: list[str] | None = None) -> int:
    from moca_fast.entry import run_main  # stops are handled and errors are one line from here

    return run_main(lambda end: _main(sys.argv[1:] if argv is None else argv), known=lambda error: None)


def _main(argv: list[str]) -> int:
    figure = choose(argv, __doc__, FIGURES, "figure")
    if isinstance(figure, int):
        return figure
    return importlib.import_module(f"moca_fast.viz.{figure}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
