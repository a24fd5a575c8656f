"""Inference: load an encoder (model only), embed, search, kNN and linear evaluation."""
