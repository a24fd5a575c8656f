"""XLA:CPU flags for the training step: Eigen convolutions instead of YNNPACK's."""
from __future__ import annotations

import os
import sys

# XLA:CPU runs convolutions on Eigen instead of YNNPACK (fastconv.py then computes only the parts
# Eigen is slow at). Experimental in jaxlib 0.10.2; numerics checked by benchmarks/step_speed.py
# (the same first loss; parameter updates differ by reduction order only: see BENCHMARKS.md,
# "Figures moved from the code") and by the whole test suite, which runs with it.
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# XLA aborts on a flag it does not know: add it only for jaxlib releases it was tested with.
EIGEN_FLAG_JAXLIB = ("0.10.",)


def prefer_eigen_convolutions() -> bool:
    """Add EIGEN_CONVOLUTIONS to XLA_FLAGS unless the user set that flag or JAX has started.

    It speeds up ResNet-18's step and leaves the small CNN's as it is (benchmarks/step_speed.py;
    BENCHMARKS.md, "Figures moved from the code"). Only the CPU backend reads the flag.
    CONTRASTIVE_XLA_FLAGS=0 leaves XLA_FLAGS alone, and so does a jaxlib outside EIGEN_FLAG_JAXLIB.
    Returns whether the flag was added.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("CONTRASTIVE_XLA_FLAGS", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    try:
        from importlib.metadata import version

        if not version("jaxlib").startswith(EIGEN_FLAG_JAXLIB):
            return False
    except ImportError:  # no jaxlib metadata (PackageNotFoundError): leave XLA alone
        return False
    if "jax" in sys.modules:  # JAX may have started its backends and read XLA_FLAGS already
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
    return True
