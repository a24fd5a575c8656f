"""contrastive: self-supervised image representations from folders of unlabeled images, on JAX."""

__version__ = "0.1.0"
