"""Pure JAX maths: losses, augmentation, embedding health, the models (their convolution passed in)."""
