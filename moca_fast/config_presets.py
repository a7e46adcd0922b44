"""The named presets: each a set of overrides of Config's defaults (the paper's ViT-B/16 recipe)."""
from __future__ import annotations

from typing import Any

from moca_fast.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe: valeoai/MOCA moca_vit_base_patch16_dec2 with main_pretrain.py defaults.
    "vit_base_dec2": {},
    "vit_large_dec2": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_small_dec2": dict(embed_dim=384, depth=12, num_heads=6),
    # Unit tests: a CPU step in well under a second.
    "tiny": dict(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, early_layer=1,
                 decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, num_words=64,
                 num_new_words=4, batch_size=4, epochs=2, warmup_epochs=0.5, num_workers=0,
                 log_every=1, ckpt_every=50, eval_every=0),
    # The embedded demo: a small ViT on MNIST digits, minutes on 2 CPU cores.
    "demo": dict(img_size=28, patch_size=7, embed_dim=128, depth=4, num_heads=4, early_layer=1,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, num_words=256,
                 num_new_words=8, skip_offset=0, batch_size=64, epochs=8, warmup_epochs=0.5, blr=6e-3,
                 lr_wgen=3e-3, weight_decay_end=0.05, momentum_start=0.97, crop_min=0.5, num_workers=2,
                 log_every=20, ckpt_every=200, eval_every=0, output="output/demo"),
}


DEFAULT_PRESET = "vit_base_dec2"


def check_preset(preset: Any) -> str:
    if not isinstance(preset, str):
        raise ConfigError(f"preset={preset!r} must be a preset name, not a {type(preset).__name__}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset
