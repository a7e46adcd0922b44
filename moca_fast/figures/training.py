"""The trainer's pictures (rank 0 only; no collective): the PCA and codes figures of a fixed set of validation
images (EVAL_IMAGES of the k-NN val folder, one per class first) at each in-training evaluation, to TensorBoard
(figures/pca, figures/codes); and at the end of a run, <output>/figures/{curves,pca,codes}.png, the last two also
to TensorBoard at the final step. A figure that fails is a logged warning: it never fails the run.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
from pathlib import Path

import torch

log = logging.getLogger("moca_fast.viz")

EVAL_IMAGES = 8
FIGURES = "figures"
TENSORBOARD_FIGURES = ("pca", "codes")


@functools.lru_cache(maxsize=2)
def _fixed_images(val_root: str, img_size: int):
    from moca_fast.figures.images import find_images, load_images

    return load_images(find_images([val_root], None, EVAL_IMAGES), img_size)


def teacher_figures(model, val_root: str, step: int, dtype: torch.dtype) -> dict:
    """{"pca", "codes"}: matplotlib figures of the model's teacher and codebook on the fixed images."""
    from moca_fast.figures import codes, pca
    from moca_fast.figures.images import patch_tokens

    cfg = model.config
    images = _fixed_images(str(val_root), cfg.img_size)
    x = images.normalized(model.codebook.words.device)
    tokens = patch_tokens(lambda batch: model.teacher_tokens(batch.to(dtype)), x)
    title = f"run {cfg.output}, step {step}"
    return {"pca": pca.draw(images, pca.pca_maps(tokens.cpu(), cfg.img_size), title),
            "codes": codes.draw(images, codes.code_maps(tokens, model.codebook), title, cfg.patch_size)}


@contextlib.contextmanager
def _contained(failure: str):
    """A failing figure is a warning, never the run's end. Then a full garbage collection: matplotlib's drawing
    leaves reference cycles through the frames of this call stack, which would keep the Trainer (and its data
    loader's worker processes, which the interpreter then waits for at exit) alive until the next one."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a picture must not end a training run
        log.warning("%s: %s: %s", failure, type(e).__name__, e)
    finally:
        gc.collect()


def log_eval_figures(writer, model, val_root: str, step: int, dtype: torch.dtype) -> None:
    """At an in-training evaluation: the figures to TensorBoard (writer None, as on ranks > 0: nothing)."""
    if writer is None:
        return
    with _contained(f"no TensorBoard figures at step {step}"):
        _to_tensorboard(writer, teacher_figures(model, val_root, step, dtype), step)


def _to_tensorboard(writer, figures: dict, step: int) -> None:
    for name in TENSORBOARD_FIGURES:
        writer.add_figure(f"figures/{name}", figures[name], step, close=False)


def write_run_figures(output: str | Path, model, val_root: str, step: int, dtype: torch.dtype) -> list[Path]:
    """At the end of a run: the PNGs in <output>/figures and the teacher figures to TensorBoard; prints where."""
    paths: list[Path] = []
    with _contained("no figures written"):
        paths = _write_run_figures(Path(output), model, val_root, step, dtype)
        print(f"figures of the run: {', '.join(map(str, paths))}", flush=True)
    return paths


def _write_run_figures(output: Path, model, val_root: str, step: int, dtype: torch.dtype) -> list[Path]:
    from moca_fast.figures.tensorboard import tensorboard_writer
    from moca_fast.figures.curves import curves_figure
    from moca_fast.figures.figure import save_png

    figures = {"curves": curves_figure([str(output)]), **teacher_figures(model, val_root, step, dtype)}
    paths = [save_png(fig, output / FIGURES / f"{name}.png") for name, fig in figures.items()]
    writer = tensorboard_writer(output / "tensorboard")
    if writer is not None:
        _to_tensorboard(writer, figures, step)
        writer.close()
    return paths
