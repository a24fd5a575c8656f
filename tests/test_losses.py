"""Losses proven three ways (STYLE.md principle 8): literal references, closed forms, invariants.

Everything runs under jax.jit; temperature and weight are traced arguments, so each shape
compiles once.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from contrastive_cli import config
from contrastive_cli.nn import health
from contrastive_cli.nn import losses

ntxent = jax.jit(losses.nt_xent)
cosine = jax.jit(losses.pairwise_cosine_loss)
dcl = jax.jit(losses.decoupled_contrastive_loss)
sigmoid = jax.jit(losses.sigmoid_loss)
metrics = jax.jit(health.batch_metrics)
LOSS_FNS = {
    "ntxent": lambda z1, z2: ntxent(z1, z2, 0.5),
    "cosine": lambda z1, z2: cosine(z1, z2, 1.0),
    "dcl": lambda z1, z2: dcl(z1, z2, 0.5),
    "sigmoid": lambda z1, z2: sigmoid(z1, z2, math.log(5.0), -2.0),
}
SHAPES = [(1, 3), (4, 8), (6, 5)]  # N = 1: no negatives; (6, 5): more views than dims
T_B = [(math.log(10.0), -10.0), (0.0, 0.0), (math.log(3.0), 1.5)]  # sigmoid (t', b): SigLIP's init, others


def views(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def simclr_algorithm1(z1, z2, tau):
    """SimCLR Algorithm 1, literally, in float64: views interleaved as z_{2k-1}, z_{2k}."""
    n = len(z1)
    z = [None] * (2 * n)
    for k in range(n):
        z[2 * k], z[2 * k + 1] = np.float64(z1[k]), np.float64(z2[k])

    def sim(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    def ell(i, j):
        denom = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def cosine_reference(z1, z2, w):
    """Loop over unordered pairs of the 2N views; average positives and negatives separately."""
    n = len(z1)
    z = [np.float64(r) for r in list(z1) + list(z2)]
    pos, neg = [], []
    for i in range(2 * n):
        for j in range(i + 1, 2 * n):
            s = z[i] @ z[j] / (np.linalg.norm(z[i]) * np.linalg.norm(z[j]))
            (pos.append(1 - s) if j == i + n else neg.append(abs(s)))
    return np.mean(pos) + w * (np.mean(neg) if neg else 0.0)


def dcl_reference(z1, z2, tau):
    """Yeh et al. eq. 6 per anchor, literally, in float64: the positive is not in the denominator."""
    n = len(z1)
    z = [np.float64(r) for r in list(z1) + list(z2)]

    def sim(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k not in (i, j))
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)
    return total / (2 * n)


def sigmoid_reference(z1, z2, t_prime, b):
    """SigLIP's pairwise sigmoid over every ordered pair of different views, summed, divided by 2N."""
    n = len(z1)
    z = [np.float64(r) for r in list(z1) + list(z2)]
    t = math.exp(t_prime)
    total = 0.0
    for i in range(2 * n):
        for j in range(2 * n):
            if i == j:
                continue
            label = 1.0 if j == (i + n) % (2 * n) else -1.0
            logit = t * (z[i] @ z[j]) / (np.linalg.norm(z[i]) * np.linalg.norm(z[j])) + b
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    return total / (2 * n)


def softplus(x):
    return math.log1p(math.exp(x))


# --- literal references -------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SHAPES)
def test_ntxent_matches_algorithm1(n, d):
    z1, z2 = views(n, d, seed=n)
    for tau in (0.1, 0.5, 1.0):
        want = simclr_algorithm1(z1, z2, tau)
        np.testing.assert_allclose(ntxent(z1, z2, tau), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d", SHAPES)
def test_cosine_matches_loop_reference(n, d):
    z1, z2 = views(n, d, seed=n)
    for w in (0.0, 1.0, 2.5):
        want = cosine_reference(z1, z2, w)
        np.testing.assert_allclose(cosine(z1, z2, w), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", SHAPES[1:])  # DCL needs N >= 2
def test_dcl_matches_eq6_reference(n, d):
    z1, z2 = views(n, d, seed=n)
    for tau in (0.1, 0.5, 1.0):
        np.testing.assert_allclose(dcl(z1, z2, tau), dcl_reference(z1, z2, tau), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d", SHAPES)
def test_sigmoid_matches_pairwise_reference(n, d):
    z1, z2 = views(n, d, seed=n)
    for t_prime, b in T_B:
        np.testing.assert_allclose(sigmoid(z1, z2, t_prime, b), sigmoid_reference(z1, z2, t_prime, b),
                                   rtol=1e-5, atol=1e-5)


# --- closed forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", SHAPES)
def test_all_parallel(n, d):
    # Every view the same direction (rows scaled differently): every logit is 1/tau.
    rng = np.random.default_rng(0)
    v = rng.normal(size=d).astype(np.float32)
    z1 = v * rng.uniform(0.5, 2, size=(n, 1)).astype(np.float32)
    z2 = v * rng.uniform(0.5, 2, size=(n, 1)).astype(np.float32)
    for tau in (0.1, 0.5):
        np.testing.assert_allclose(ntxent(z1, z2, tau), math.log(2 * n - 1), atol=1e-5)
    # Positives perfect (0), negatives all |1|: the loss is the negative weight (0 when N = 1).
    np.testing.assert_allclose(cosine(z1, z2, 0.7), 0.7 if n > 1 else 0.0, atol=1e-6)
    # DCL: the positive's 1/tau cancels one of the 2N - 2 equal negatives' terms.
    if n > 1:
        for tau in (0.1, 0.5):
            np.testing.assert_allclose(dcl(z1, z2, tau), math.log(2 * n - 2), atol=1e-5)
    # Sigmoid: every logit is x = t + b; one positive and 2N - 2 negatives per anchor.
    for t_prime, b in T_B:
        x = math.exp(t_prime) + b
        want = softplus(-x) + (2 * n - 2) * softplus(x)
        np.testing.assert_allclose(sigmoid(z1, z2, t_prime, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d", [(1, 3), (4, 8)])
def test_orthonormal_pairs(n, d):
    # z1 = z2 = first N rows of the identity: positives cos 1, all 2N - 2 negatives cos 0.
    z = np.eye(d, dtype=np.float32)[:n]
    for tau in (0.1, 0.5, 1.0):
        want = math.log1p((2 * n - 2) * math.exp(-1 / tau))
        np.testing.assert_allclose(ntxent(z, z, tau), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cosine(z, z, 1.0), 0.0, atol=1e-7)
    for t_prime, b in T_B:  # positives logit t + b, negatives (cosine 0) logit b
        want = softplus(-(math.exp(t_prime) + b)) + (2 * n - 2) * softplus(b)
        np.testing.assert_allclose(sigmoid(z, z, t_prime, b), want, rtol=1e-5, atol=1e-6)
    if n > 1:  # DCL: -1/tau + log of 2N - 2 terms exp(0)
        for tau in (0.1, 0.5, 1.0):
            np.testing.assert_allclose(dcl(z, z, tau), math.log(2 * n - 2) - 1 / tau, rtol=1e-5, atol=1e-5)


def test_sigmoid_at_siglip_init_starts_near_its_balanced_point():
    # SigLIP's init t = 10, b = -10: a pair at cosine 1 has logit 0 (loss log 2 either way), and
    # orthogonal negatives already cost little (softplus(-10) each), so the loss is about log 2.
    z = np.eye(16, dtype=np.float32)[:8]
    np.testing.assert_allclose(sigmoid(z, z, math.log(10.0), -10.0), math.log(2) + 14 * softplus(-10),
                               rtol=1e-5)
    # float32 sums of 64 terms in another order: AVX-512 and AVX2 differ by ~1.5e-6 relative.
    np.testing.assert_allclose(losses.sigmoid_loss(z, z), sigmoid(z, z, math.log(10.0), -10.0), rtol=1e-5)


def test_dcl_needs_two_pairs():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        losses.decoupled_contrastive_loss(jnp.ones((1, 4)), jnp.ones((1, 4)))


def test_sigmoid_scale_and_bias_get_gradients():
    # They are trained parameters: the loss must depend on both, with finite gradients.
    z1, z2 = views(4, 8)
    g_scale, g_bias = jax.jit(jax.grad(losses.sigmoid_loss, argnums=(2, 3)))(z1, z2, math.log(10.0), -10.0)
    assert np.isfinite(g_scale) and np.isfinite(g_bias) and g_scale != 0 and g_bias != 0
    # At b = -10 nearly all pairs are predicted negative: the 2N positives pull b up (gradient < 0).
    assert g_bias < 0


# --- invariants ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_FNS)
def test_invariances(name):
    fn = LOSS_FNS[name]
    z1, z2 = views(6, 5, seed=1)
    base = fn(z1, z2)
    rng = np.random.default_rng(2)
    perm = rng.permutation(6)
    scale1, scale2 = (rng.uniform(0.01, 100, size=(6, 1)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(fn(z2, z1), base, rtol=1e-6)  # swap the views
    np.testing.assert_allclose(fn(z1 * scale1, z2 * scale2), base, rtol=1e-5)  # positive row scales
    np.testing.assert_allclose(fn(z1[perm], z2[perm]), base, rtol=1e-6)  # reorder the pairs


@pytest.mark.parametrize("name", LOSS_FNS)
def test_gradients_finite_at_degenerate_inputs(name):
    grad = jax.jit(jax.grad(LOSS_FNS[name], argnums=(0, 1)))
    z1, z2 = views(4, 8)
    one_zero_row = z1.copy()
    one_zero_row[2] = 0
    zeros = np.zeros_like(z1)
    same = np.ones_like(z1)
    for a, b in [(zeros, zeros), (one_zero_row, z2), (same, same), (z1, z1)]:
        assert all(np.isfinite(g).all() for g in grad(a, b))
        assert np.isfinite(LOSS_FNS[name](a, b))
    # A zero row is cosine 0 with everything: NT-Xent of an all-zero batch is log(2N - 1).
    np.testing.assert_allclose(ntxent(zeros, zeros, 0.5), math.log(7), atol=1e-6)
    np.testing.assert_allclose(dcl(zeros, zeros, 0.5), math.log(6), atol=1e-6)


def test_bf16_inputs_give_float32():
    z1, z2 = views(4, 8)
    b1, b2 = jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16)
    f1, f2 = b1.astype(jnp.float32), b2.astype(jnp.float32)  # the same values, exactly
    for fn in LOSS_FNS.values():
        out = fn(b1, b2)
        assert out.dtype == jnp.float32 and out.shape == ()
        np.testing.assert_allclose(out, fn(f1, f2), rtol=1e-6)
    assert all(v.dtype == jnp.float32 for v in metrics(b1, b2).values())


# --- agreement with optax -----------------------------------------------------------------------


def test_ntxent_agrees_with_optax():
    # optax takes one [2N, D] batch plus labels and averages over its 2N (anchor, positive) pairs,
    # which with two views per label is exactly our mean over 2N anchors. Its default tau is 0.07.
    def theirs(z1, z2, tau):
        n = z1.shape[0]
        labels = jnp.concatenate([jnp.arange(n), jnp.arange(n)])
        return optax.losses.ntxent(jnp.concatenate([z1, z2]), labels, tau)

    theirs_jit = jax.jit(theirs)
    z1, z2 = views(4, 8, seed=3)
    z1[1] = 0  # a zero row: both floor the squared norm at finfo(float32).eps
    for tau in (0.07, 0.5, 1.0):
        np.testing.assert_allclose(ntxent(z1, z2, tau), theirs_jit(z1, z2, tau), rtol=1e-5)
    z1[1] = 1
    ours_g = jax.jit(jax.grad(losses.nt_xent))(z1, z2, 0.2)
    theirs_g = jax.jit(jax.grad(theirs))(z1, z2, 0.2)
    np.testing.assert_allclose(ours_g, theirs_g, rtol=1e-4, atol=1e-6)


# --- the trainer's table ------------------------------------------------------------------------


def test_losses_table_matches_config_and_has_uniform_signature():
    assert set(losses.LOSSES) == set(config.LOSSES)
    assert losses.LEARNED_SCALARS <= set(losses.LOSSES)
    z1, z2 = views(4, 8)
    want = {"ntxent": ntxent(z1, z2, 0.3), "cosine": cosine(z1, z2, 1.0), "dcl": dcl(z1, z2, 0.3),
            "sigmoid": sigmoid(z1, z2, 0.5, -1.0)}
    for name, fn in losses.LOSSES.items():
        out = jax.jit(fn)(z1, z2, temperature=0.3, logit_scale=jnp.float32(0.5), logit_bias=jnp.float32(-1.0))
        np.testing.assert_allclose(out, want[name], rtol=1e-6, err_msg=name)
    # Without the scalars, the sigmoid loss uses SigLIP's initial values.
    np.testing.assert_allclose(losses.LOSSES["sigmoid"](z1, z2, temperature=0.3),
                               sigmoid(z1, z2, math.log(10.0), -10.0), rtol=1e-6)


def test_mismatched_views_are_rejected():
    with pytest.raises(ValueError, match=r"z1 \(4, 8\) and z2 \(3, 8\)"):
        losses.nt_xent(jnp.zeros((4, 8)), jnp.zeros((3, 8)))


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_orthonormal_pairs():
    n = d = 4
    z = np.eye(d, dtype=np.float32)
    m = metrics(z, 3 * z)  # scale must not matter
    want = {
        "pos_cos": 1.0, "neg_cos": 0.0, "cos_gap": 1.0, "top1": 1.0, "alignment": 0.0,
        "uniformity": -4.0,  # every distinct pair within a view is at squared distance 2
        "emb_std": math.sqrt(n - 1) / n,  # each column holds two 1s among 2N entries
        "eff_rank": n - 1,  # centring removes one direction; the rest are equal
    }
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, atol=1e-5, err_msg=k)


def test_metrics_collapse():
    z = np.tile(np.arange(1, 9, dtype=np.float32), (4, 1))  # [4, 8], every row the same
    m = metrics(z, 2 * z)
    want = {"pos_cos": 1, "neg_cos": 1, "cos_gap": 0, "alignment": 0, "uniformity": 0, "emb_std": 0}
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(m["eff_rank"], 1.0, atol=1e-3)
    # All similarities tie and ties go to the lowest index: view 0 picks view 1, the rest view 0,
    # which is the positive only of view N = 4.
    np.testing.assert_allclose(metrics(z, z)["top1"], 1 / 8)


def test_metrics_match_numpy_on_random_views():
    n, d = 6, 5
    z1, z2 = views(n, d, seed=4)
    m = metrics(z1, z2)
    u = np.concatenate([z1, z2]).astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    s = u @ u.T
    pos = (np.arange(2 * n) + n) % (2 * n)
    neg = [s[i, j] for i in range(2 * n) for j in range(2 * n) if j not in (i, pos[i])]
    np.fill_diagonal(s, -np.inf)
    sv = np.linalg.svd(u - u.mean(0), compute_uv=False)
    p = sv / sv.sum()

    def unif(x):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        return np.log(np.mean([np.exp(-2 * np.sum((x[i] - x[j]) ** 2)) for i, j in pairs]))

    want = {
        "pos_cos": np.mean(np.sum(u[:n] * u[n:], axis=1)),
        "neg_cos": np.mean(neg),
        "top1": np.mean(s.argmax(1) == pos),
        "emb_std": u.std(0).mean(),
        "alignment": np.mean(np.sum((u[:n] - u[n:]) ** 2, axis=1)),
        "uniformity": (unif(u[:n]) + unif(u[n:])) / 2,
        "eff_rank": np.exp(-np.sum(p * np.log(p))),
    }
    for k, v in want.items():
        np.testing.assert_allclose(m[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(m["cos_gap"], m["pos_cos"] - m["neg_cos"], rtol=1e-6)
    np.testing.assert_allclose(m["alignment"], 2 - 2 * m["pos_cos"], rtol=1e-5)


# --- collapse ------------------------------------------------------------------------------------


def test_collapse_signal_on_constructed_batches():
    rng = np.random.default_rng(5)
    d = 64
    healthy = {k: float(v) for k, v in metrics(*views(16, d, seed=5)).items()}
    assert health.collapse_signal(healthy, d) is None
    # Every image the same point: all three signals fire, with the figures.
    point = rng.normal(size=(1, d)).astype(np.float32)
    same = np.repeat(point, 16, axis=0)
    text = health.collapse_signal({k: float(v) for k, v in metrics(same, 2 * same).items()}, d)
    assert text is not None and "emb_std" in text and "eff_rank 1." in text and "both > 0.99" in text
    assert "0.2/sqrt(64)" in text and "pos_cos 1.000, neg_cos 1.000, top1" in text
    # Nearly the same point: tiny isotropic noise keeps the (scale-free) effective rank high, but
    # emb_std and the cosines still see the collapse.
    z1, z2 = (point + 1e-4 * rng.normal(size=(16, d)).astype(np.float32) for _ in range(2))
    text = health.collapse_signal({k: float(v) for k, v in metrics(z1, z2).items()}, d)
    assert text is not None and "emb_std" in text and "both > 0.99" in text and "eff_rank" not in text
    # Dimensional collapse: spread along one line through the origin only (cosines +-1, rank ~1).
    line = rng.choice([-1.0, 1.0], size=(16, 1)).astype(np.float32) * point
    text = health.collapse_signal({k: float(v) for k, v in metrics(line, line).items()}, d)
    assert text is not None and "eff_rank" in text and "both" not in text
    # The emb_std floor scales with 1/sqrt(D).
    record = dict(healthy, emb_std=0.03)
    assert "emb_std 0.03 < 0.05" in health.collapse_signal(record, 16)  # floor 0.2/sqrt(16)
    assert health.collapse_signal(record, 400) is None  # floor 0.01
