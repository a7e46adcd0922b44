"""Evaluation cores shared by the evaluation commands and the in-training probes (below both)."""
