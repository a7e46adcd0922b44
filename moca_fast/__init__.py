"""moca_fast: the fastest correct trainer for MOCA self-supervised ViT pretraining."""
from moca_fast.config import Config, load_config
from moca_fast.config_presets import PRESETS

__all__ = ["Config", "PRESETS", "load_config", "build_model", "MOCA"]


def build_model(preset="vit_base_dec2", **overrides):
    """Builds the MOCA model of a preset; `overrides` are Config fields (e.g. impl="reference")."""
    from moca_fast.model.moca import build_model as _build

    return _build(preset, **overrides)


def __getattr__(name):
    if name == "MOCA":
        from moca_fast.model.moca import MOCA

        return MOCA
    raise AttributeError(name)
