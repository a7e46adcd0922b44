"""The numeric settings' allowed intervals and their one-line checks, and the output folder's probe write."""
from __future__ import annotations

import dataclasses
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
DATA_BACKENDS = ("auto", "dali", "nvjpeg", "torch", "synthetic")
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


#: the largest finite float32: the optimiser's state and step sizes are float32 whatever the precision
FLOAT32_MAX = 3.4028234663852886e38
#: the prototype generators' BatchNorm1d normalises over the codebook's words: it needs more than one
MIN_NUM_WORDS = 2


def check_float32_range(cfg) -> None:
    """ConfigError for the first float setting beyond float32's range (it would overflow in the optimiser)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "float" in str(f.type) and value is not None:
            if any(abs(v) > FLOAT32_MAX for v in (value if isinstance(value, tuple) else (value,))):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name}={shown} is beyond float32's range (at most {FLOAT32_MAX:.4g}), the "
                                  f"optimiser's dtype")


def check_codebook_size(cfg) -> None:
    if cfg.num_words < MIN_NUM_WORDS:
        raise ConfigError(f"num_words={cfg.num_words} must be at least {MIN_NUM_WORDS}: the prototype generators' "
                          f"BatchNorm normalises over the codebook's words")


def check_optimiser_step_size(cfg, world_size: int) -> None:
    """ConfigError when a learning rate makes AdamW's float32 step overflow: its first step moves a weight by
    up to lr / (1 - adam_betas[0]) and scales it by 1 - lr * weight decay."""
    if cfg.lr is not None:
        peak = ("lr", cfg.lr, cfg.lr)
    else:  # lr = blr * effective batch / 256 (moca_fast.train.schedules.base_lr)
        peak = ("blr", cfg.blr, cfg.blr * cfg.batch_size * cfg.grad_accum * world_size / 256)
    decay = max(cfg.weight_decay, cfg.weight_decay_end)
    for (name, given, lr), wd in ((peak, decay), (("lr_wgen", cfg.lr_wgen, cfg.lr_wgen), cfg.weight_decay_wgen)):
        step, shrink = lr / (1 - cfg.adam_betas[0]), lr * wd
        if step > FLOAT32_MAX or shrink > FLOAT32_MAX:
            raise ConfigError(f"{name}={given} overflows the optimiser's float32 step (lr {lr:.4g}: first step "
                              f"lr / (1 - adam_betas[0]) = {step:.4g}, weight decay factor lr * wd = {shrink:.4g}; "
                              f"float32 holds at most {FLOAT32_MAX:.4g})")


def check_output_folder(output: str) -> None:
    """ConfigError unless `output` is a folder files can be written in, or can be created as one (a real probe
    write: a read-only filesystem is found here, not at the first checkpoint)."""
    check_folder(output, f"output={output}")
