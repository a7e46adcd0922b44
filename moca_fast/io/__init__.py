"""Model files in and out: official valeoai/MOCA checkpoints, our own model file, timm teacher export.

CLI: `python -m moca_fast.io import|export --help`. The names below load on first use, so that the CLI's main
(moca_fast.io.__main__) starts before torch is imported and handles a stop from its first line.
"""
import importlib

_HOMES = {"load_model": "native", "save_model": "native", "load_official": "official",
          "official_to_ours": "official", "ours_to_official": "official", "export_teacher_timm": "timm_export",
          "timm_spec": "timm_export"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f"moca_fast.io.{_HOMES[name]}"), name)
    raise AttributeError(name)
