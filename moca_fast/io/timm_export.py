"""Export of the teacher encoder in timm's VisionTransformer key layout.

Our ViT already uses timm's names (cls_token, pos_embed, patch_embed.proj.*, blocks.i.*, norm.*), so the
export is the teacher's state dict plus the exact `timm.create_model` call that takes it with strict=True:

    model = timm.create_model(meta["timm_model"], pretrained=False, **meta["timm_kwargs"])
    timm.models.load_checkpoint(model, path, strict=True)

e.g. for ViT-B/16: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
global_pool="token", img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0);
`forward_features` then returns the teacher's tokens [B, 1 + L, C] (final LayerNorm applied).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moca_fast.config import Config
from moca_fast.model.moca import MOCA

#: timm's registered ViTs at 224 px: (patch_size, embed_dim, depth, num_heads) -> name
_TIMM_NAMES = {
    (16, 384, 12, 6): "vit_small_patch16_224",
    (16, 768, 12, 12): "vit_base_patch16_224",
    (16, 1024, 24, 16): "vit_large_patch16_224",
}
TIMM_EPS = 1e-6  # timm VisionTransformer's default LayerNorm eps


def timm_spec(cfg: Config) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) of the ViT matching cfg's encoder.

    Standard sizes use their timm name; any other size uses vit_base_patch16_224 with every dimension
    overridden (timm lets create_model kwargs override the registered ones). All dimensions are always
    written, so the call is exact either way.
    """
    if cfg.norm_eps != TIMM_EPS:
        raise ValueError(f"norm_eps={cfg.norm_eps}: timm export supports only timm's LayerNorm eps {TIMM_EPS}")
    dims = (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads)
    name = _TIMM_NAMES.get(dims, "vit_base_patch16_224")
    kwargs = dict(num_classes=0, global_pool="token", img_size=cfg.img_size, in_chans=cfg.in_chans,
                  patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                  mlp_ratio=float(cfg.mlp_ratio))
    return name, kwargs


def export_teacher_timm(model: MOCA, path: str | Path) -> tuple[str, dict]:
    """Writes the teacher encoder in timm layout; returns (timm model name, create_model kwargs).

    `.safetensors`: the tensors, with "timm_model" and "timm_kwargs" (JSON) in the file's metadata.
    Any other suffix: torch.save({"state_dict": tensors, "timm_model": name, "timm_kwargs": kwargs}).
    """
    path = Path(path)
    name, kwargs = timm_spec(model.config)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.teacher.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise ValueError(f"{path}: writing .safetensors needs the safetensors package "
                             f"(pip install safetensors), or use a .pth path") from None
        save_file(state, str(path), metadata={"timm_model": name, "timm_kwargs": json.dumps(kwargs),
                                              "source": "moca_fast teacher encoder"})
    else:
        torch.save({"state_dict": state, "timm_model": name, "timm_kwargs": kwargs}, path)
    return name, kwargs
