"""python -m moca_fast.viz {pca,codes,masks,curves,neighbors,segment} [flags]  (each: --help). Each writes one PNG."""
import sys

from moca_fast.subcommands import dispatch

FIGURES = {"pca": "the teacher's patch tokens, first three PCA components as RGB",
           "codes": "the codebook word the teacher assigns each patch, its entropy, the most used words",
           "masks": "the two masking rounds of a training step: encoder-visible tokens, decoder positions",
           "curves": "losses, lr and k-NN of one or more runs (metrics.jsonl)",
           "neighbors": "nearest training images of query images by the teacher's features",
           "segment": "segmentation probe: image, ground truth, prediction, per-class IoU (eval segment's examples)"}


def main(argv: list[str] | None = None) -> int:
    return dispatch("moca_fast.viz", sys.argv[1:] if argv is None else argv, __doc__, FIGURES, "figure")


if __name__ == "__main__":
    sys.exit(main())
