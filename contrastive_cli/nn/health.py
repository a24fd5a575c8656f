"""Label-free health of a batch of projections: are positives aligned, are views spread out?

Pure, jit-compatible functions of two views' projections z1, z2 [N, D] (row i of each is a
positive pair), logged by `pretrain` every log step, and the collapse signal read from them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The losses' own pair masks and normalisation, so metrics see exactly the pairs the losses see.
from .losses import _EPS, _MASK, _masked_mean, _masks, _views


def batch_metrics(z1: jax.Array, z2: jax.Array) -> dict[str, jax.Array]:
    """Label-free health of a batch of projections, all float32 scalars; jit-able.

    Args:
      z1, z2: [N, D] projections of two views; (z1[i], z2[i]) is a positive pair. Rows are
        L2-normalised first (u = z / ||z||); "views" below are the 2N rows of concat([u1, u2]).

    Returns a dict with:
      pos_cos: mean cosine of the N positive pairs (1 when views agree).
      neg_cos: mean signed cosine over negative pairs (different views, not each other's positive).
      cos_gap: pos_cos - neg_cos.
      top1: fraction of the 2N views whose most similar other view is its positive (ties go to
        the lowest index).
      emb_std: mean over the D dims of the std (ddof 0) across the 2N unit views. Collapse -> 0;
        spread-out unit vectors -> about 1/sqrt(D) (SimSiam, Chen & He 2021, sec. 4.1).
      alignment: Wang & Isola (2020) L_align with alpha = 2: mean ||u1_i - u2_i||^2 over positives.
      uniformity: Wang & Isola L_uniform with t = 2: log mean exp(-2 ||u - v||^2) over the distinct
        pairs within one view, averaged over the two views (as in their reference code). 0 at
        collapse, lower is more uniform; orthonormal rows give -4. With N = 1 it is 0.
      eff_rank: effective rank (Roy & Vetterli 2007) of the centred [2N, D] matrix of unit views:
        exp of the entropy of its singular values normalised to sum 1. Collapse -> 1.
    """
    u, s = _views(z1, z2)
    n = z1.shape[0]
    self_mask, pos_mask, neg_mask = _masks(n)
    u1, u2 = u[:n], u[n:]  # [N, D] each

    pos_cos = jnp.mean(jnp.sum(u1 * u2, axis=1))
    neg_cos = _masked_mean(s, neg_mask)
    nearest = jnp.argmax(jnp.where(self_mask, -jnp.inf, s), axis=1)  # [2N]
    top1 = jnp.mean((nearest == np.argmax(pos_mask, axis=1)).astype(jnp.float32))
    emb_std = jnp.mean(jnp.std(u, axis=0))
    alignment = jnp.mean(jnp.sum((u1 - u2) ** 2, axis=1))

    sq = jnp.sum(u * u, axis=1)  # [2N]; 1, or 0 for a zero row
    dist2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * s, 0.0)  # [2N, 2N]
    within = np.triu(np.ones((n, n), dtype=bool), k=1)  # distinct pairs i < j of one view

    def uniform(d2: jax.Array) -> jax.Array:
        if n < 2:
            return jnp.float32(0.0)
        return jax.nn.logsumexp(jnp.where(within, -2.0 * d2, _MASK)) - np.log(within.sum())

    uniformity = (uniform(dist2[:n, :n]) + uniform(dist2[n:, n:])) / 2

    sv = jnp.linalg.svd(u - jnp.mean(u, axis=0), compute_uv=False)
    p = sv / (jnp.sum(sv) + _EPS)  # all-zero singular values (exact collapse) -> p = 0, rank 1
    eff_rank = jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p, p)))

    return {
        "pos_cos": pos_cos,
        "neg_cos": neg_cos,
        "cos_gap": pos_cos - neg_cos,
        "top1": top1,
        "emb_std": emb_std,
        "alignment": alignment,
        "uniformity": uniformity,
        "eff_rank": eff_rank,
    }


COLLAPSE_STD = 0.2  # emb_std below COLLAPSE_STD / sqrt(D) signals collapse
COLLAPSE_RANK = 2.0  # eff_rank below this: the batch spans about one direction
COLLAPSE_COS = 0.99  # positives and negatives both this similar: every view looks alike


def collapse_signal(record: dict, dim: int) -> str | None:
    """Do one log record's health metrics (`batch_metrics`, as floats) say the projections collapsed?

    Collapse: all images map to (nearly) one point or one direction, so the loss can no longer
    tell them apart. Any of these signals it:
      emb_std < 0.2 / sqrt(D)   spread-out unit vectors give about 1/sqrt(D) (SimSiam, sec. 4.1);
      eff_rank < 2              the 2N views span about one direction;
      pos_cos > 0.99 and neg_cos > 0.99   every view is as close to every other as to its positive.

    Args:
      record: a dict with at least emb_std, eff_rank, pos_cos, neg_cos and top1.
      dim: D, the width of the projections the metrics were computed on.

    Returns the failing signals with their figures as one line of text, or None when healthy.
    """
    std_floor = COLLAPSE_STD / math.sqrt(dim)
    failed = []
    if record["emb_std"] < std_floor:
        failed.append(f"emb_std {record['emb_std']:.2g} < {std_floor:.2g} (0.2/sqrt({dim}); "
                      f"spread-out embeddings give ~{1 / math.sqrt(dim):.2g})")
    if record["eff_rank"] < COLLAPSE_RANK:
        failed.append(f"eff_rank {record['eff_rank']:.2f} < {COLLAPSE_RANK:g}")
    if record["pos_cos"] > COLLAPSE_COS and record["neg_cos"] > COLLAPSE_COS:
        failed.append(f"positive and negative cosines both > {COLLAPSE_COS:g}")
    if not failed:
        return None
    return "; ".join(failed) + (f" (pos_cos {record['pos_cos']:.3f}, neg_cos {record['neg_cos']:.3f}, "
                                f"top1 {record['top1']:.2f})")
