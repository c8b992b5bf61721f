"""NumPy references of the published formulas, written here from the papers (never by
calling jaxsim), and the realistic layers the precision tests use; shared by the tests."""

import numpy as np


def np_gram_rbf(x, threshold=1.0):
    sq = np.sum(x * x, axis=1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    return np.exp(-d / (2 * threshold**2 * np.median(d)))


def np_centering(n):
    return np.eye(n) - np.ones((n, n)) / n


def np_hsic_biased(k, l):
    n = k.shape[0]
    h = np_centering(n)
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def np_hsic_unbiased(k, l):
    # Song et al. 2012, eq. 5: the three-term form with zero diagonals.
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    term1 = np.trace(k @ l)
    term2 = (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * (one @ k @ l @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def np_cka(k, l, debiased=False):
    h = np_hsic_unbiased if debiased else np_hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def np_linear_cka(x, y, debiased=False):
    return np_cka(x @ x.T, y @ y.T, debiased)


def np_inv_sqrt(s):
    w, v = np.linalg.eigh(np.linalg.pinv(s))
    return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T


def np_cca(x, y, epsilon=0.0):
    """Coefficients, left and right singular vectors, kept-unit masks."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    kx, ky = np.diag(sxx) >= epsilon, np.diag(syy) >= epsilon
    sxx, syy, sxy = sxx[kx][:, kx], syy[ky][:, ky], sxy[kx][:, ky]
    t = (
        np_inv_sqrt(sxx + epsilon * np.eye(len(sxx)))
        @ sxy
        @ np_inv_sqrt(syy + epsilon * np.eye(len(syy)))
    )
    u, s, vh = np.linalg.svd(t)
    return s, u, vh, kx, ky


def np_svcca(x, y, k):
    def reduce(a):
        ac = a - a.mean(0)
        u, s, vh = np.linalg.svd(ac, full_matrices=False)
        return u[:, :k] * s[:k]

    return np_cca(reduce(x), reduce(y))[0].mean()


def np_pwcca(x, y, epsilon=0.0):
    s, u, vh, kx, ky = np_cca(x, y, epsilon)
    if kx.sum() <= ky.sum():
        acts, vecs = x[:, kx], u
    else:
        acts, vecs = y[:, ky], vh.T
    mean = acts.mean(0)
    directions = (acts - mean) @ vecs + mean  # mean of unit i added to direction i
    q, _ = np.linalg.qr(directions)
    weights = np.abs(q.T @ acts).sum(axis=1)
    weights = weights / weights.sum()
    return np.sum(weights * s)


def power_law(rng, n, d1, d2, alpha, offset=5.0, noise=0.1):
    """Two layers whose covariance spectra fall like k^-alpha (as real layers' do), in
    random bases, sharing their leading directions, with a common offset."""
    lam = np.arange(1, d1 + 1) ** -alpha
    z = rng.normal(size=(n, d1)) * np.sqrt(lam)
    q1 = np.linalg.qr(rng.normal(size=(d1, d1)))[0]
    q2 = np.linalg.qr(rng.normal(size=(d2, d2)))[0]
    y = z[:, :d2] + noise * rng.normal(size=(n, d2)) * np.sqrt(lam[:d2])
    return z @ q1 + offset, y @ q2 - offset


def relu_layers(rng, n, d1, d2):
    x, y = power_law(rng, n, d1, d2, 1.0, offset=0.0)
    return np.maximum(x + 0.05, 0), np.maximum(y @ rng.normal(size=(d2, d2)) / 10 + 0.02, 0)
