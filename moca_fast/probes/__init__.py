"""Evaluation cores that the trainer and moca_fast.eval both use: features of a teacher over a list of images,
gathered over ranks (features), and the weighted k-NN classifier (knn); the segmentation probe's scores
(segmentation_metrics), head and sliding windows (segmentation_head), training and scoring
(segmentation_train), cached features (segmentation_cache) and examples file (segmentation_examples).
Imports no application."""
