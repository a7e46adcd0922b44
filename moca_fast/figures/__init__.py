"""Drawing code that the trainer and moca_fast.viz both use: the canvas and PNG helpers (figure), the images a
figure shows (images), the PCA, codes and curves figures, TensorBoard's writer and the trainer's end-of-run and
in-training figures (training). Imports no application (train, eval, viz)."""
