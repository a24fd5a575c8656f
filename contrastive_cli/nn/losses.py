"""Pure contrastive losses and label-free batch health metrics.

Losses: pairwise cosine (the seed's), NT-Xent (SimCLR), decoupled contrastive (DCL) and pairwise
sigmoid (SigLIP, with a learned scale and bias); metrics: `batch_metrics`, `collapse_signal`.

Every function takes the projections of two augmented views, `z1` and `z2`, each [N, D], where row
i of `z1` and row i of `z2` come from the same image (a positive pair). The 2N views are stacked as
`z = concat([z1, z2])` ([2N, D]), so view i's positive is view (i + N) mod 2N. All functions are
pure and jit-compatible; they cast to float32 before normalising, so bf16 projections still get
float32 similarities, and they return float32 scalars.

Normalisation: a row is divided by max(||z||, sqrt(eps)) with eps = finfo(float32).eps, i.e. the
squared norm is floored at eps (norm ~3.5e-4). A zero row therefore stays zero (cosine 0 with every
view) instead of giving NaN, and its gradient stays finite. This is the same floor as
`optax.losses.ntxent` uses on float32 input, so the two agree even for degenerate rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_EPS = float(jnp.finfo(jnp.float32).eps)  # floor on the squared row norm
# Masked logits get this instead of -inf: exp() of it is exactly 0 and no inf*0 reaches a gradient.
_MASK = float(jnp.finfo(jnp.float32).min) / 2


def _check(z1: jax.Array, z2: jax.Array) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"views must both be [N, D]; got z1 {z1.shape} and z2 {z2.shape}")


def _normalise(z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), _EPS))


def _views(z1: jax.Array, z2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unit rows u [2N, D] and their cosine matrix s [2N, 2N], in float32."""
    _check(z1, z2)
    u = _normalise(jnp.concatenate([z1, z2], axis=0))  # [2N, D]
    # HIGHEST: on TPU (bf16 passes) and GPU (TF32) a default float32 matmul would cost ~3 digits.
    s = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)  # [2N, 2N]
    return u, s


def _masks(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static masks over the 2N x 2N view pairs: self, positive, negative (neither)."""
    self_mask = np.eye(2 * n, dtype=bool)
    pos_mask = np.roll(self_mask, n, axis=1)  # view i's positive is view (i + N) mod 2N
    neg_mask = ~(self_mask | pos_mask)
    return self_mask, pos_mask, neg_mask


def _masked_mean(x: jax.Array, mask: np.ndarray) -> jax.Array:
    # An empty mask (N = 1 has no negatives) gives 0, not 0/0.
    return jnp.sum(jnp.where(mask, x, 0.0)) / max(int(mask.sum()), 1)


def pairwise_cosine_loss(z1: jax.Array, z2: jax.Array, negative_weight: float = 1.0) -> jax.Array:
    """The seed loss: pull positive pairs to cosine 1, push every other pair to cosine 0.

    Args:
      z1, z2: [N, D] projections of two views; (z1[i], z2[i]) is a positive pair. Any float dtype.
      negative_weight: weight w of the negative term.

    Returns:
      float32 scalar  L = mean_{positive (i,j)} (1 - s_ij) + w * mean_{negative (i,j)} |s_ij|,
      where s_ij is the cosine similarity of views i and j among the 2N views. A negative pair is
      any two different views that are not each other's positive (N * (2N - 2) unordered pairs
      against N positive ones); self-pairs are excluded. With N = 1 the negative term is 0.

    The two terms are averaged separately, not summed over all pairs: each view has one positive
    and 2N - 2 negatives, so a plain sum would be dominated by the negative term, and the cheapest
    way to lower it is to push everything apart (orthogonal) rather than to align positives.
    Averaging each term gives the two equal say whatever the batch size. |s| ignores the sign:
    negatives are pushed to orthogonal, not to -1, which no more than two views can reach at once.
    |s| has a subgradient at 0 (JAX uses 0), which is fine for gradient descent.
    """
    _, s = _views(z1, z2)
    _, pos_mask, neg_mask = _masks(z1.shape[0])
    return _masked_mean(1.0 - s, pos_mask) + negative_weight * _masked_mean(jnp.abs(s), neg_mask)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
    """SimCLR's NT-Xent loss (Chen et al. 2020, eq. 1 and Algorithm 1).

    "l(i, j) = -log [exp(sim(z_i, z_j)/tau) / sum_{k=1}^{2N} 1[k != i] exp(sim(z_i, z_k)/tau)]
    ... The final loss is computed across all positive pairs, both (i, j) and (j, i), in a
    mini-batch."  Here sim is cosine similarity.

    Args:
      z1, z2: [N, D] projections of two views; (z1[i], z2[i]) is a positive pair. Any float dtype.
      temperature: tau > 0.

    Returns:
      float32 scalar: the cross entropy of each of the 2N anchors (logits s_ik / tau over all
      k != i, target its positive), averaged over the 2N anchors, i.e. Algorithm 1's
      L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]. Equal to
      `optax.losses.ntxent(concat([z1, z2]), concat([arange(N), arange(N)]), temperature)`, which
      averages over its 2N (anchor, positive) pairs; note optax's default temperature is 0.07.
      Closed forms: all rows parallel gives log(2N - 1); z1 = z2 = orthonormal rows gives
      log(1 + (2N - 2) exp(-1/tau)).
    """
    _, s = _views(z1, z2)
    n = z1.shape[0]
    self_mask, pos_mask, _ = _masks(n)
    logits = jnp.where(self_mask, _MASK, s / temperature)  # [2N, 2N], self excluded
    # Stable logsumexp, kept shifted: log sum exp(l - max) - (l_pos - max). Unshifting first,
    # logsumexp(l) - l_pos, would cancel two numbers ~1/tau and lose digits when the loss is small.
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=1, keepdims=True))
    positive = jnp.sum(jnp.where(pos_mask, logits, 0.0), axis=1)  # [2N]
    return jnp.mean(jnp.log(jnp.sum(jnp.exp(logits), axis=1)) - positive)


def decoupled_contrastive_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
    """Decoupled contrastive learning loss, DCL (Yeh et al. 2022, eq. 6 with w = 1): NT-Xent with
    the positive removed from the denominator.

    "L_DC = -log [exp(<z_i, z_j>/tau) / sum_{k != i, k != j} exp(<z_i, z_k>/tau)]": removing the
    positive decouples the pull on the positive from the push on the negatives, which in NT-Xent
    share a factor (the "negative-positive coupling") that shrinks the gradient when the batch is
    small or the positive is already close.

    Args:
      z1, z2: [N, D] projections of two views, N >= 2; (z1[i], z2[i]) is a positive pair.
      temperature: tau > 0.

    Returns:
      float32 scalar: the mean over the 2N anchors of -s_pos/tau + logsumexp over the 2N - 2
      negatives of s/tau (s cosine similarities). It can be negative. Closed forms: all rows
      parallel gives log(2N - 2); z1 = z2 = orthonormal rows gives log(2N - 2) - 1/tau.

    Raises ValueError for N = 1: with no negatives the denominator is an empty sum.
    """
    _, s = _views(z1, z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"the decoupled contrastive loss needs at least 2 pairs (negatives); got {n}")
    _, pos_mask, neg_mask = _masks(n)
    logits = s / temperature  # [2N, 2N]
    positive = jnp.sum(jnp.where(pos_mask, logits, 0.0), axis=1)  # [2N]
    negatives = jnp.where(neg_mask, logits, _MASK)  # self and positive excluded
    # Shifted as in nt_xent: log sum exp(l - max) + (max - l_pos), no cancellation of two ~1/tau terms.
    top = jax.lax.stop_gradient(jnp.max(negatives, axis=1))
    return jnp.mean(jnp.log(jnp.sum(jnp.exp(negatives - top[:, None]), axis=1)) + (top - positive))


SIGMOID_LOGIT_SCALE = math.log(10.0)  # SigLIP's initial t' (t = exp(t') = 10)
SIGMOID_LOGIT_BIAS = -10.0  # SigLIP's initial b


def sigmoid_loss(z1: jax.Array, z2: jax.Array, logit_scale: jax.Array | float = SIGMOID_LOGIT_SCALE,
                 logit_bias: jax.Array | float = SIGMOID_LOGIT_BIAS) -> jax.Array:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1), over the 2N views.

    "logits = dot(zimg, ztxt.T) * t + b; labels = 2 * eye(n) - ones(n);
    l = -sum(log_sigmoid(labels * logits)) / n". Every ordered pair of different views (i, j) is
    an independent binary classification: positive (label +1) when j is i's other view, negative
    (label -1) otherwise; no softmax over the batch. Self-pairs are excluded.

    Args:
      z1, z2: [N, D] projections of two views; (z1[i], z2[i]) is a positive pair.
      logit_scale: t', with the scale t = exp(t') (so t stays positive); learned, initially log 10.
      logit_bias: b; learned, initially -10, so the many negatives start with a small loss.

    Returns:
      float32 scalar  L = 1/(2N) sum_i sum_{j != i} -log sigmoid(y_ij (t s_ij + b)), y_ij = +-1:
      the sum over each anchor's 2N - 1 pairs, averaged over the 2N anchors (SigLIP divides by the
      batch, not by the number of pairs). Closed forms with x = t + b: all rows parallel gives
      softplus(-x) + (2N - 2) softplus(x); z1 = z2 = orthonormal rows gives
      softplus(-x) + (2N - 2) softplus(b).
    """
    _, s = _views(z1, z2)
    self_mask, pos_mask, _ = _masks(z1.shape[0])
    logits = jnp.exp(logit_scale) * s + logit_bias  # [2N, 2N]
    labels = np.where(pos_mask, 1.0, -1.0)
    # log_sigmoid is softplus-based: finite for any logit, no log(0).
    pair_loss = jnp.where(self_mask, 0.0, -jax.nn.log_sigmoid(labels * logits))
    return jnp.sum(pair_loss) / (2 * z1.shape[0])


# The trainer's table: loss name (config.LOSSES) -> fn(z1, z2, *, temperature, logit_scale, logit_bias)
# -> float32 scalar. One signature for all, so the step needs no per-loss branch; each loss ignores
# what it does not use. logit_scale/logit_bias are the learned scalars (models.LogitScalars) of the
# losses in LEARNED_SCALARS; the others get the defaults.
def _ntxent_entry(z1, z2, *, temperature, logit_scale=SIGMOID_LOGIT_SCALE, logit_bias=SIGMOID_LOGIT_BIAS):
    return nt_xent(z1, z2, temperature)


def _cosine_entry(z1, z2, *, temperature, logit_scale=SIGMOID_LOGIT_SCALE, logit_bias=SIGMOID_LOGIT_BIAS):
    return pairwise_cosine_loss(z1, z2)


def _dcl_entry(z1, z2, *, temperature, logit_scale=SIGMOID_LOGIT_SCALE, logit_bias=SIGMOID_LOGIT_BIAS):
    return decoupled_contrastive_loss(z1, z2, temperature)


def _sigmoid_entry(z1, z2, *, temperature, logit_scale=SIGMOID_LOGIT_SCALE, logit_bias=SIGMOID_LOGIT_BIAS):
    return sigmoid_loss(z1, z2, logit_scale, logit_bias)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "ntxent": _ntxent_entry, "cosine": _cosine_entry, "dcl": _dcl_entry, "sigmoid": _sigmoid_entry}
LEARNED_SCALARS = frozenset({"sigmoid"})  # losses whose (logit_scale, logit_bias) are trained parameters
