"""Pictures of a run: what the teacher learned (pca, codes, neighbors), what MOCA predicts (codes, masks) and
how the run went (curves). `python -m moca_fast.viz --help`; the trainer's hooks are in moca_fast.figures.training."""
