"""The teacher's codebook assignment of each patch: the target the student learns to predict.

The assignment is the training's reference path (moca_fast.reference_ops.assign_reference) with the source's own
codebook and its sharpening inv_delta / dist_norm_prev: codes = softmax_K(inv_delta / dist_norm * cos(token,
word)). Shown per image: the image; each patch coloured by its word (the argmax of its codes; the most used words
each a colour, listed in the legend, the others grey); the entropy of its codes (nats; ln K is a uniform
assignment). Below: the most used words, each with image patches that chose it (most confident first).
Needs a source with a codebook: a run, checkpoint, model file, official checkpoint or preset (not a timm export).

python -m moca_fast.viz codes --checkpoint RUN [IMAGES ...] [--data demo]
"""
from __future__ import annotations

import sys

from moca_fast.errors import ConfigError
from moca_fast.figures.codes import code_maps, draw
from moca_fast.model.codebook import OnlineCodebook
from moca_fast.viz import cli


def needs_codebook(codebook: OnlineCodebook | None, source: str) -> OnlineCodebook:
    if codebook is None:
        raise ConfigError(f"{source} holds no codebook: give a run, checkpoint, model file or official checkpoint")
    return codebook


def figure(argv: list[str]):
    """(the figure, a summary line, the parsed flags) of the command line argv."""
    args = cli.parser("codes", __doc__).parse_args(argv)
    inputs = cli.load_inputs(args)
    teacher = inputs.teacher
    maps = code_maps(inputs.tokens, needs_codebook(teacher.codebook, teacher.source))
    summary = (f"codebook assignments of {len(inputs.images)} images: {maps.words.size} patches use "
               f"{int((maps.uses > 0).sum())} of {maps.num_words} words")
    return draw(inputs.images, maps, inputs.title, teacher.cfg.patch_size), summary, args


def main(argv: list[str] | None = None) -> int:
    return cli.run(figure, argv)


if __name__ == "__main__":
    sys.exit(main())
