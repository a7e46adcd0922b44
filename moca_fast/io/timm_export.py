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

import hashlib
import json
import math
from pathlib import Path

import torch

from moca_fast.config import Config
from moca_fast.model.moca import MOCA
from moca_fast.output_files import atomic_file

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


def export_digest(state: dict[str, torch.Tensor], kwargs: dict) -> str:
    """sha256 of the create_model kwargs and every tensor (name, dtype, shape, bytes): recorded in an export,
    it binds the metadata to the weights (num_heads, for one, leaves no trace in the weights)."""
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def weight_sizes(state: dict[str, torch.Tensor]) -> dict[str, int | float]:
    """The encoder sizes a ViT state dict shows (those of its tensors that are present)."""
    sizes = {}
    if "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].dim() == 4:
        width, sizes["in_chans"], sizes["patch_size"], _ = state["patch_embed.proj.weight"].shape
        sizes["embed_dim"] = width
        if "pos_embed" in state and state["pos_embed"].dim() == 3:
            sizes["img_size"] = math.isqrt(state["pos_embed"].shape[1] - 1) * sizes["patch_size"]
    sizes["depth"] = len({name.split(".")[1] for name in state if name.startswith("blocks.")})
    if "blocks.0.mlp.fc1.weight" in state and "embed_dim" in sizes:
        sizes["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / sizes["embed_dim"]
    return {name: int(v) if name != "mlp_ratio" else float(v) for name, v in sizes.items()}


def export_teacher_timm(model: MOCA, path: str | Path) -> tuple[str, dict]:
    """Writes the teacher encoder in timm layout, atomically; returns (timm model name, create_model kwargs).

    `.safetensors`: the tensors, with "timm_model", "timm_kwargs" (JSON) and "sha256" (export_digest) in the
    file's metadata. Any other suffix: torch.save({"state_dict": tensors, "timm_model": name,
    "timm_kwargs": kwargs, "sha256": digest}).
    """
    path = Path(path)
    name, kwargs = timm_spec(model.config)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.teacher.state_dict().items()}
    digest = export_digest(state, kwargs)
    with atomic_file(path) as tmp:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise ValueError(f"{path}: writing .safetensors needs the safetensors package "
                                 f"(pip install safetensors), or use a .pth path") from None
            save_file(state, str(tmp), metadata={"timm_model": name, "timm_kwargs": json.dumps(kwargs),
                                                 "sha256": digest, "source": "moca_fast teacher encoder"})
        else:
            torch.save({"state_dict": state, "timm_model": name, "timm_kwargs": kwargs, "sha256": digest}, tmp)
    return name, kwargs
