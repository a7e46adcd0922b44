"""Evaluation cores that the trainer and moca_fast.eval both use: features of a teacher over a list of images,
gathered over ranks (features), and the weighted k-NN classifier (knn). Imports no application."""
