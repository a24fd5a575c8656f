"""contrastive: self-supervised image representations from folders of unlabeled images, on JAX."""

__version__ = "0.1.0"

from .runtime import prefer_eigen_convolutions, tune_malloc

# Before numpy, JAX or any thread starts: glibc fixes its arena count at the first thread's malloc.
tune_malloc()
# Before JAX's CPU backend starts: XLA reads XLA_FLAGS once.
prefer_eigen_convolutions()
