"""Model files in and out: official valeoai/MOCA checkpoints, our own model file, timm teacher export.

CLI: `python -m moca_fast.io import|export --help`.
"""
from moca_fast.io.native import load_model, save_model
from moca_fast.io.official import CheckpointError, load_official, official_to_ours, ours_to_official
from moca_fast.io.timm_export import export_teacher_timm, timm_spec

__all__ = ["CheckpointError", "load_official", "official_to_ours", "ours_to_official", "load_model", "save_model",
           "export_teacher_timm", "timm_spec"]
