"""Import of checkpoints written by the official implementation (valeoai/MOCA main_pretrain.py).

Such a file is a dict {"model": state_dict, "optimizer", "epoch", "scaler", "args": argparse.Namespace}.
It is read with torch.load(weights_only=True) allowing exactly one extra class, argparse.Namespace.
Every official tensor is mapped to one of ours (or is a known, checked, non-loaded entry); anything
missing, unexpected or of the wrong shape is an error naming the file — nothing is inferred.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from moca_fast.errors import CheckpointError
from moca_fast.model.moca import MOCA, build_model


#: (official name, our name) — a pair ending in "." maps a prefix, otherwise the exact name.
_BOW = "bow_extractor.bow_extractor.0."
_GEN = "layers_w.0.generator."
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("encoder.", "encoder."),
    ("encoder_teacher.", "teacher."),
    (_BOW + "_embedding", "codebook.words"),
    (_BOW + "_embedding_ptr", "codebook.ptr"),
    (_BOW + "_dist_norm", "codebook.dist_norm"),
    (_BOW + "_dist_norm_prev", "codebook.dist_norm_prev"),
    ("encoder_pred." + _GEN + "b0_fc.", "img_generator.mlp.0."),
    ("encoder_pred." + _GEN + "b0_bn.", "img_generator.mlp.1."),
    ("encoder_pred." + _GEN + "b0_last_layer.", "img_generator.mlp.3."),
    ("encoder_pred.layers_w.0.skip.", "img_generator.skip."),
    ("decoder_pred." + _GEN + "b0_fc.", "dense_generator.mlp.0."),
    ("decoder_pred." + _GEN + "b0_bn.", "dense_generator.mlp.1."),
    ("decoder_pred." + _GEN + "b0_last_layer.", "dense_generator.mlp.3."),
    ("decoder_pred.layers_w.0.skip.", "dense_generator.skip."),
    ("norm_cls_pt.", "decoder.norm_in."),
    ("decoder_embed_cls_pt.", "decoder.embed."),
    ("mask_token_cls_pt", "decoder.mask_token"),
    ("decoder_blocks_cls_pt.", "decoder.blocks."),
    ("decoder_norm_cls_pt.", "decoder.norm."),
    ("decoder_pos_embed", "decoder.pos_embed"),
)
#: official entries checked against the config instead of loaded (κ is fixed, not a weight)
KAPPA_KEYS = ("encoder_pred.scale", "decoder_pred.scale")
#: official entries with no counterpart: a step counter only used for logging
DROPPED_KEYS = (_BOW + "_track_num_batches",)
#: our entries set from the config, not from the checkpoint
CONFIG_KEYS = ("kappa",)

#: official architectures (models_moca.py): their settings that no tensor shape reveals
_BASE_HEADS = dict(num_heads=12, decoder_num_heads=16)
_OFFICIAL_ARCHS = {
    **{f"moca_vit_base_patch16_dec512d{d}b": _BASE_HEADS for d in (1, 2, 4, 8)},
    **{f"moca_vit_base_patch16_dec{d}": _BASE_HEADS for d in (1, 2, 4, 8)},
    "moca_vit_large_patch16_dec512d2b": dict(num_heads=16, decoder_num_heads=16),
    "moca_vit_large_patch16_dec2": dict(num_heads=16, decoder_num_heads=16),
}
#: official args fields that change the model's function without changing any shape
_ARGS_FIELDS = ("kappa", "inv_delta", "early_layer")


def _translate(name: str, pairs) -> str | None:
    for src, dst in pairs:
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def official_to_ours(name: str) -> str | None:
    """Our parameter/buffer name for an official state-dict key, or None if it has none."""
    return _translate(name, KEY_MAP)


def ours_to_official(name: str) -> str | None:
    """The official state-dict key of one of our parameter/buffer names, or None."""
    return _translate(name, [(dst, src) for src, dst in KEY_MAP])


def _load_failure(e: BaseException) -> str:
    """The informative line of a torch.load error (weights_only errors wrap it in boilerplate)."""
    reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    if reason:
        return reason.group(1).strip()
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_checkpoint(path: str | Path, allowed=(argparse.Namespace,)) -> dict:
    """torch.load(weights_only=True) with exactly the classes in `allowed` added to torch's defaults
    (for this call only); one-line CheckpointError for anything that is not such a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    allow = torch.serialization.safe_globals(list(allowed))  # a context: nothing stays allowed after the call
    try:
        with allow:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # arbitrary bytes make the unpickler fail in arbitrary ways
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused:
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in allowed) or "none"
            raise CheckpointError(f"{path}: refused to unpickle {refused.group(1)} (allowed classes: {names})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_load_failure(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found a {type(obj).__name__}")
    return obj


def read_official(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """The state dict under "model" and the args Namespace (None if absent) of an official checkpoint."""
    ckpt = read_checkpoint(path)
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(f"{path}: is a plain state dict; expected an official MOCA checkpoint "
                                  f"(main_pretrain.py) with the weights under 'model'")
        raise CheckpointError(f"{path}: has no 'model' entry (keys: {', '.join(map(str, ckpt)) or 'none'}); "
                              f"expected an official MOCA checkpoint written by main_pretrain.py")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    args = ckpt.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, expected an argparse.Namespace")
    return state, args


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _check_args(path: Path, args: argparse.Namespace | None, model: MOCA, preset: str) -> None:
    """Settings recorded in the checkpoint's args that the config must match (shapes cannot show them)."""
    if args is None:
        return
    cfg = model.config
    expected = {f: getattr(args, f) for f in _ARGS_FIELDS if hasattr(args, f)}
    expected.update(_OFFICIAL_ARCHS.get(getattr(args, "model", None), {}))
    for field, value in expected.items():
        if not isinstance(value, (int, float)) or float(getattr(cfg, field)) != float(value):
            raise CheckpointError(f"{path}: was trained with {field}={value} (model {getattr(args, 'model', '?')}) "
                                  f"but preset {preset!r} has {field}={getattr(cfg, field)}; pass {field}={value}")


def map_official_state(path: Path, state: dict[str, torch.Tensor], model: MOCA, preset: str) -> dict:
    """Translates an official state dict to `model`'s names, checking names, shapes and κ."""
    ours = model.state_dict()
    mapped, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        if key in KAPPA_KEYS:
            if value.numel() != 1 or float(value) != float(model.kappa):
                raise CheckpointError(f"{path}: {key} (kappa) is {value.tolist()} but preset {preset!r} has "
                                      f"kappa={model.config.kappa}; pass kappa={value.flatten()[0].item():g}")
            continue
        if key in DROPPED_KEYS:
            continue
        name = official_to_ours(key)
        if name is None or name not in ours:
            unexpected.append(key)
        elif value.shape != ours[name].shape:
            mismatched.append(f"{key} {list(value.shape)} vs {list(ours[name].shape)}")
        else:
            mapped[name] = value
    if unexpected:
        raise CheckpointError(f"{path}: unexpected entries for preset {preset!r}: {_few(unexpected)}")
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch (checkpoint vs preset {preset!r}): {_few(mismatched)}")
    missing = [ours_to_official(n) or n for n in ours if n not in mapped and n not in CONFIG_KEYS]
    kappa_keys = KAPPA_KEYS if model.use_dense_loss else KAPPA_KEYS[:1]
    missing += [k for k in kappa_keys if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing entries for preset {preset!r}: {_few(missing)}")
    for name in CONFIG_KEYS:
        mapped[name] = ours[name]
    return mapped


def load_official(path: str | Path, preset: str = "vit_base_dec2", **overrides) -> MOCA:
    """Builds build_model(preset, **overrides) and loads an official MOCA checkpoint into it.

    Loads student, teacher, codebook (words, ptr, dist_norm, dist_norm_prev), both prototype generators
    (BatchNorm statistics included) and the decoder; checks κ and the recorded args against the config.
    """
    path = Path(path)
    state, args = read_official(path)
    model = build_model(preset, **overrides)
    mapped = map_official_state(path, state, model, preset)
    _check_args(path, args, model, preset)
    model.load_state_dict(mapped, strict=True)
    return model
