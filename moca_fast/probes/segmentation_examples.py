"""A few validation predictions of a segmentation probe, in one file beside the result JSON
(<output without .json>_examples.npz), which `python -m moca_fast.viz segment` draws.

Arrays image_k (uint8 [H, W, 3], the image at its mask's size), labels_k and pred_k (uint8 [H, W], IGNORE =
255 in labels) for k < count, and meta: JSON text with count, classes, names, the mIoU, per-class IoU, pixel
accuracy and the source. Written atomically; read without pickles (np.load allow_pickle=False).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from moca_fast.errors import ConfigError
from moca_fast.data.segmentation import SegmentationSet
from moca_fast.output_files import atomic_file


def examples_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_examples.npz")


def write_examples(output: str | os.PathLike, data: SegmentationSet, examples: list, result: dict,
                   base: int | None = None) -> Path:
    """examples: [(index into data, prediction uint8 [H, W])]; result: the command's result (miou, iou,
    pixel_accuracy, checkpoint)."""
    arrays, names = {}, []
    for k, (index, pred) in enumerate(examples):
        image, labels, _ = data.read(index)
        arrays[f"image_{k}"] = np.asarray(image.convert("RGB"), dtype=np.uint8)
        arrays[f"labels_{k}"] = labels
        arrays[f"pred_{k}"] = np.asarray(pred, dtype=np.uint8)
        names.append(os.path.basename(data.images[index]))
    meta = {"count": len(examples), "classes": data.classes, "names": names, "miou": result["miou"],
            "iou": result["iou"], "pixel_accuracy": result["pixel_accuracy"], "source": result["checkpoint"],
            "base_size": base}
    path = examples_path(output)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    return path


def read_examples(path: str | os.PathLike) -> tuple[dict, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(meta, [(image, labels, pred)]); a file that is not such a file is a ConfigError naming it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            items = [(f[f"image_{k}"], f[f"labels_{k}"], f[f"pred_{k}"]) for k in range(int(meta["count"]))]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (written by python -m moca_fast.eval segment)") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a segmentation examples file ({type(e).__name__}: {e})") from None
    return meta, items
