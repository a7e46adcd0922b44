"""Evaluation of pretrained teachers: k-NN (DINO protocol)."""
