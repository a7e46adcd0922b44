"""The teacher encoder to evaluate, from any source the evaluation commands accept.

  --checkpoint RUN_OR_CHECKPOINT_FOLDER        a launch/train.py run (its latest checkpoint) or a checkpoint
  --checkpoint model.pt                        our model file (python -m moca_fast.io import --out)
  --checkpoint official.pth --preset P         an official valeoai/MOCA checkpoint of preset P's architecture
  --checkpoint teacher.safetensors|.pth        our timm export (python -m moca_fast.io export)
  --preset P  (no --checkpoint)                preset P randomly initialised as training starts (seed 0)
Every file is read weights-only (safetensors, or torch.load(weights_only=True)).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moca_fast.config import Config, check_preset_agrees, load_config
from moca_fast.config_checks import check_ranges
from moca_fast.config_parse import apply_overrides
from moca_fast.config_presets import PRESETS
from moca_fast.errors import ConfigError
from moca_fast.io.timm_export import export_digest, weight_sizes
from moca_fast.model.codebook import OnlineCodebook
from moca_fast.model.vit import ViTEncoder

log = logging.getLogger("moca_fast.eval")

#: timm create_model kwargs of an export -> our Config fields
_TIMM_TO_CONFIG = ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass
class Teacher:
    """The teacher ViT (fp32, eval mode), the config of its sizes, and a description of the source; the
    online codebook (words and dist_norm) where the source holds one (not a timm export), and the
    training step where the source records it (a checkpoint)."""

    encoder: ViTEncoder
    cfg: Config
    source: str
    codebook: OnlineCodebook | None = None
    step: int | None = None


def load_teacher(checkpoint: str | None, preset: str | None, device) -> Teacher:
    if checkpoint is None:
        if preset is None:
            raise ConfigError("give --checkpoint (run folder, checkpoint folder or file) or --preset")
        cfg = _preset(preset)
        from moca_fast.model.moca import MOCA

        torch.manual_seed(cfg.seed)  # as launch/train.py does before building the model
        model = MOCA(cfg, 1)
        teacher = Teacher(model.teacher, cfg, f"preset {preset} at random initialisation (seed {cfg.seed})",
                          model.codebook)
    elif not Path(checkpoint).exists():
        raise ConfigError(f"--checkpoint {checkpoint}: not a checkpoint folder, run folder or file (no such path)")
    elif Path(checkpoint).is_dir():
        teacher = _from_folder(checkpoint)
    elif Path(checkpoint).suffix == ".safetensors":
        teacher = _from_safetensors(Path(checkpoint))
    else:
        teacher = _from_file(Path(checkpoint), preset)
    if checkpoint is not None:
        check_preset_agrees(preset, teacher.cfg, f"--checkpoint {checkpoint}")
    teacher.encoder = teacher.encoder.to(device).float().eval().requires_grad_(False)
    if teacher.codebook is not None:
        teacher.codebook = teacher.codebook.to(device).float()
    return teacher


def _preset(preset: str) -> Config:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    return load_config(preset)


def _weights_mismatch(path, e: RuntimeError) -> ConfigError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
    return ConfigError(f"--checkpoint {path}: weights of another architecture ({detail[:200]})")


def _from_folder(folder: str) -> Teacher:
    from moca_fast.io.checkpoints import load_trained_model, read_meta

    try:
        model, cfg, found = load_trained_model(folder, "cpu")
    except RuntimeError as e:  # load_state_dict: the saved weights do not fit the saved config
        raise _weights_mismatch(folder, e) from None
    return Teacher(model.teacher, cfg, f"checkpoint {found}", model.codebook, read_meta(found).get("step"))


def _from_file(path: Path, preset: str | None) -> Teacher:
    from moca_fast.io import load_model, load_official
    from moca_fast.io.native import is_native
    from moca_fast.io.official import read_checkpoint

    ckpt = read_checkpoint(path)
    if is_native(ckpt):
        model = load_model(path)
        return Teacher(model.teacher, model.config, f"model file {path}", model.codebook)
    if "timm_model" in ckpt and "state_dict" in ckpt:
        return _timm_teacher(path, ckpt["state_dict"], ckpt.get("timm_kwargs"), ckpt.get("sha256"))
    if "model" in ckpt:
        if preset is None:
            raise ConfigError(f"--checkpoint {path}: an official checkpoint needs --preset "
                              f"(one of {', '.join(sorted(PRESETS))})")
        _preset(preset)
        model = load_official(path, preset)
        return Teacher(model.teacher, model.config, f"official checkpoint {path} (preset {preset})", model.codebook)
    raise ConfigError(f"--checkpoint {path}: not a moca_fast model file, timm export or official MOCA checkpoint "
                      f"(keys: {', '.join(map(str, list(ckpt)[:6])) or 'none'})")


def _from_safetensors(path: Path) -> Teacher:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"--checkpoint {path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    if "timm_kwargs" not in meta:
        raise ConfigError(f"--checkpoint {path}: no timm_kwargs metadata (not written by python -m moca_fast.io export)")
    try:
        kwargs = json.loads(meta["timm_kwargs"])
    except json.JSONDecodeError as e:
        raise ConfigError(f"--checkpoint {path}: malformed export metadata: timm_kwargs is not JSON ({e})") from None
    return _timm_teacher(path, state, kwargs, meta.get("sha256"))


def _export_config(path: Path, state, kwargs) -> Config:
    """The encoder sizes of an export's metadata, checked for form, and against what its weights show."""
    where = f"--checkpoint {path}"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: malformed export: the weights are not a state dict of tensors")
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{where}: malformed export metadata: timm_kwargs is a {type(kwargs).__name__}, "
                          f"not a mapping")
    missing = [name for name in _TIMM_TO_CONFIG if name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: malformed export metadata: timm_kwargs lacks {', '.join(missing)}")
    try:
        cfg = apply_overrides(Config(), {name: kwargs[name] for name in _TIMM_TO_CONFIG})
        check_ranges(cfg, _TIMM_TO_CONFIG)
    except ConfigError as e:
        raise ConfigError(f"{where}: malformed export metadata: {e}") from None
    if cfg.embed_dim % cfg.num_heads or cfg.img_size % cfg.patch_size:
        raise ConfigError(f"{where}: malformed export metadata: embed_dim {cfg.embed_dim} / num_heads "
                          f"{cfg.num_heads} or img_size {cfg.img_size} / patch_size {cfg.patch_size} is not whole")
    for name, actual in weight_sizes(state).items():
        if actual != getattr(cfg, name):
            raise ConfigError(f"{where}: weights of another architecture than its metadata says ({name} "
                              f"{getattr(cfg, name)} in the metadata, {actual} in the weights)")
    return cfg


def _timm_teacher(path: Path, state, kwargs, digest: str | None) -> Teacher:
    """Our timm export uses our own parameter names, so it loads straight into our ViT. num_heads leaves no
    trace in the weights: the sha256 of weights and metadata, recorded at export, binds it to them."""
    cfg = _export_config(path, state, kwargs)
    if digest is None:
        log.warning("%s: no sha256 in its metadata (exported by an older version): num_heads=%d is not verified",
                    path, cfg.num_heads)
    elif digest != export_digest(state, kwargs):
        raise ConfigError(f"--checkpoint {path}: its metadata and weights do not match the sha256 recorded at "
                          f"export (edited since?)")
    encoder = ViTEncoder(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth, cfg.num_heads,
                         cfg.mlp_ratio, cfg.norm_eps)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _weights_mismatch(path, e) from None
    return Teacher(encoder, cfg, f"timm export {path}")


class TeacherTokens(nn.Module):
    """x [B, 3, H, W] -> (tokens before the final LayerNorm, after it), each [B, 1 + L, C] fp32, [CLS] first.

    The pre-norm tokens are read by a hook on the final LayerNorm, so the encoder's own forward runs unchanged.
    """

    def __init__(self, encoder: ViTEncoder):
        super().__init__()
        self.encoder = encoder
        self._pre: torch.Tensor | None = None
        encoder.norm.register_forward_hook(self._keep_input)

    def _keep_input(self, module, inputs, output) -> None:
        self._pre = inputs[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, final = self.encoder(x)
        else:
            _, final = self.encoder(x)
        pre, self._pre = self._pre, None
        return pre.float(), final.float()
