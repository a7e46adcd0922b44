"""The numeric settings' allowed intervals and their one-line checks, and the output folder's probe write."""
from __future__ import annotations

import math

from moca_fast.errors import ConfigError
from moca_fast.output_files import check_output_folder as check_folder


#: every numeric field's allowed interval: (low, high, low included, high included); inf for no bound
_ANY_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = (0, math.inf, False, False), (0, math.inf, True, False), \
    (1, math.inf, True, False)
_UNIT_OPEN_HIGH, _UNIT_OPEN_LOW = (0, 1, True, False), (0, 1, False, True)
FIELD_RANGES: dict[str, tuple] = {
    **{name: _AT_LEAST_1 for name in (
        "img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
        "decoder_num_heads", "num_words", "num_new_words", "epochs", "batch_size", "grad_accum", "max_steps",
        "log_every", "ckpt_every", "knn_k", "keep_checkpoints", "lr_epochs_mul")},
    **{name: _ANY_POSITIVE for name in (
        "mlp_ratio", "norm_eps", "inv_delta", "dist_norm_init", "kappa", "pred_mlp_ratio", "blr", "lr",
        "knn_temperature")},
    **{name: _NON_NEGATIVE for name in (
        "skip_offset", "img_weight", "loc_weight", "warmup_epochs", "weight_decay", "weight_decay_end", "lr_wgen",
        "weight_decay_wgen", "clip_grad", "num_workers", "eval_every", "cpu_threads")},
    "in_chans": (3, 3, True, True),  # the loaders produce RGB
    "early_layer": (0, math.inf, True, False),  # and < depth (validate)
    "dist_norm_decay": _UNIT_OPEN_HIGH,
    "mask_ratio": _UNIT_OPEN_HIGH,
    "dec_mask_ratio": _UNIT_OPEN_HIGH,
    "adam_betas": _UNIT_OPEN_HIGH,
    "activation_memory_budget": _UNIT_OPEN_LOW,
    "momentum_start": _UNIT_OPEN_LOW,
    "crop_min": _UNIT_OPEN_LOW,
    "seed": (0, 2**63, True, False),
}
DATA_FIELDS = ("crop_min", "num_workers")
PAIRS = ("mask_ratio", "dec_mask_ratio", "adam_betas")


def _interval(low, high, low_in, high_in) -> str:
    low_text, high_text = (f"{x}" if isinstance(x, int) else f"{x:g}" for x in (low, high))
    if low == high:
        return low_text
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low_text}"
    return f"in {'[' if low_in else '('}{low_text}, {high_text}{']' if high_in else ')'}"


def check_ranges(cfg, names=FIELD_RANGES) -> None:
    """ConfigError (one line) for the first field outside its FIELD_RANGES interval, NaN or inf included."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        values = value if name in PAIRS else (value,)
        if name in PAIRS and len(values) != 2:
            raise ConfigError(f"{name}={list(values)} must hold exactly two values")
        low, high, low_in, high_in = FIELD_RANGES[name]
        for v in values:
            inside = (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
            if not (inside and math.isfinite(v)):
                shown = list(value) if name in PAIRS else value
                raise ConfigError(f"{name}={shown} must be {_interval(low, high, low_in, high_in)}"
                                  + (" (each value)" if name in PAIRS else ""))


def check_output_folder(output: str) -> None:
    """ConfigError unless `output` is a folder files can be written in, or can be created as one (a real probe
    write: a read-only filesystem is found here, not at the first checkpoint)."""
    check_folder(output, f"output={output}")
