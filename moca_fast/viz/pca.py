"""PCA of the teacher's patch tokens as RGB (the DINO-style figure).

One scikit-learn PCA is fitted over the final patch tokens of all the images together; its first three
components, each min-max scaled over all patches of all images, are the red, green and blue of every patch, so a
colour means the same thing in every image. The token grid is shown at the image's resolution (nearest neighbour:
each patch one flat colour). With --foreground the first component, thresholded, is shown as a foreground mask:
patches above --threshold (or below, when most border patches are above: the border is taken to be background).

python -m moca_fast.viz pca --checkpoint RUN [IMAGES ...] [--data demo] [--foreground]
"""
from __future__ import annotations

import sys

from moca_fast.figures.pca import draw, pca_maps
from moca_fast.viz import cli


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    p = cli.parser("pca", __doc__)
    p.add_argument("--foreground", action="store_true", help="also show the first component thresholded as a mask")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="foreground threshold on the first component (default 0: its mean)")
    args = p.parse_args(argv)
    inputs = cli.load_inputs(args)
    maps = pca_maps(inputs.tokens.cpu(), inputs.teacher.cfg.img_size, args.foreground, args.threshold)
    share = ", ".join(f"{100 * v:.0f}" for v in maps.explained)
    return (draw(inputs.images, maps, inputs.title),
            f"PCA of {len(inputs.images)} images' patch tokens (components 1-3: {share} % of the variance)", args)


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
