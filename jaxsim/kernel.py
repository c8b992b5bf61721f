r"""Kernel alignment: Gram matrices, HSIC and centered kernel alignment (CKA).

Every function takes activations as ``(n, ...)`` arrays, axis 0 indexing the n examples
(google/svcca uses the transpose, ``(neurons, n)``). Trailing axes are flattened.

References:
  Kornblith, Norouzi, Lee & Hinton, Similarity of Neural Network Representations
  Revisited, ICML 2019.
  Song, Smola, Gretton, Bedo & Borgwardt, Feature Selection via Dependence Maximization,
  JMLR 2012 (the unbiased HSIC estimator).
  Nguyen, Raghu & Kornblith, Do Wide and Deep Networks Learn the Same Things?, ICLR 2021.
  Szekely & Rizzo, Partial distance correlation with methods for dissimilarities, 2014
  (U-centering).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _distances, _feature_route, _kernel_blocks, _rbf_median
from jaxsim import _validation as _v
from jaxsim._measure import (
    GramBlocks,
    Measure,
    bounded_ratio,
    dot,
    evaluate,
    inner,
    poison,
    rounding_zero,
    safe_sqrt,
    unit_scaled,
)

__all__ = ["center_gram", "cka", "gram_linear", "gram_rbf", "hsic", "linear_cka", "rbf_cka"]


_UNBIASED_WHY = " for the unbiased HSIC estimator (it divides by n(n-3))"


def _checked(
    x: Any, y: Any, debiased: bool, check_finite: bool, grams: bool = False
) -> tuple[Array, Array]:
    """Two layers (``grams``: two Gram matrices) validated for the chosen estimator."""
    check = _v.gram_pair if grams else _v.pair
    return check(
        x,
        y,
        min_n=4 if debiased else 2,
        why=_UNBIASED_WHY if debiased else "",
        check_finite=check_finite,
    )


@jax.jit
def _gram_linear(x: Array) -> Array:
    return dot(x, x.T)


@jax.jit
def _gram_rbf(x: Array, threshold: Array) -> Array:
    d = _distances.sq_distances(x)
    nan = jnp.isnan(poison(x))  # a distance is NaN only where a feature is NaN or inf
    return _kernel_blocks.rbf_of(d, _rbf_median.median_of_non_negative(d, nan), threshold)


def gram_linear(x: Any, *, check_finite: bool = True) -> Array:
    r"""Linear kernel Gram matrix :math:`K = X X^\top`.

    Args:
      x: activations, shape ``(n, ...)``; trailing axes are flattened to features.
      check_finite: raise on NaN/inf (skipped automatically for traced values).
    Returns:
      ``(n, n)`` array in the inputs' floating dtype.
    """
    x = _v.activations(x, "x", check_finite_values=check_finite)
    return _gram_linear(x)


def gram_rbf(x: Any, *, threshold: float = 1.0, check_finite: bool = True) -> Array:
    r"""RBF kernel Gram matrix with the median-distance bandwidth of Kornblith et al.

    .. math:: K_{ij} = \exp\left(-\frac{D_{ij}}{2\,t^2\,\mathrm{median}(D)}\right)

    where :math:`D_{ij} = \lVert x_i - x_j \rVert^2` and the median runs over all
    :math:`n^2` entries, zero diagonal included, as in the paper's demo code. If that median
    is 0 (more than half the pairs coincide) the kernel is the indicator of identical rows.

    Args:
      x: activations, shape ``(n, ...)``.
      threshold: ``t``, the bandwidth as a fraction of the median distance; > 0.
      check_finite: raise on NaN/inf.
    Returns:
      ``(n, n)`` array.
    """
    x = _v.activations(x, "x", check_finite_values=check_finite)
    t = _v.positive(threshold, "threshold")
    return _gram_rbf(x, jnp.asarray(t, x.dtype))


@functools.partial(jax.jit, static_argnames="unbiased")
def _center_gram(k: Array, unbiased: bool) -> Array:
    return _kernel_blocks.u_center(k) if unbiased else _kernel_blocks.double_center(k)


def center_gram(gram: Any, *, debiased: bool = False, check_finite: bool = True) -> Array:
    r"""Centers a Gram matrix.

    Biased: :math:`H K H` with :math:`H = I - \frac{1}{n} 1 1^\top`.
    Unbiased (U-centering, Szekely & Rizzo 2014): with the diagonal of K set to zero,

    .. math:: \tilde K_{ij} = K_{ij} - \frac{r_i + r_j}{n-2} + \frac{s}{(n-1)(n-2)},
       \quad i \ne j, \qquad \tilde K_{ii} = 0,

    :math:`r` the row sums and :math:`s` the total sum. Then
    :math:`\langle \tilde K, \tilde L \rangle / (n(n-3))` is the unbiased HSIC of Song et al.

    Args:
      gram: ``(n, n)`` symmetric matrix.
      debiased: U-center instead of double-center (needs n >= 4).
    Returns:
      ``(n, n)`` centered matrix.
    """
    unbiased = bool(debiased)
    k = _v.gram(gram, "gram")
    _v.finite({"gram": gram}, check_finite)
    _v.same_n({"gram": k}, min_n=4 if unbiased else 1, why=_UNBIASED_WHY if unbiased else "")
    return _center_gram(k, unbiased)


def _hsic_scale(n: int, unbiased: bool) -> float:
    return n * (n - 3) if unbiased else (n - 1) ** 2


@functools.partial(jax.jit, static_argnames="unbiased")
def _hsic(k: Array, l: Array, unbiased: bool) -> Array:
    kc, lc = _center_gram(k, unbiased), _center_gram(l, unbiased)
    return inner(kc, lc) / _hsic_scale(k.shape[0], unbiased)


def hsic(gram_x: Any, gram_y: Any, *, debiased: bool = False, check_finite: bool = True) -> Array:
    r"""Hilbert-Schmidt independence criterion of two Gram matrices.

    Biased: :math:`\mathrm{tr}(K H L H) / (n-1)^2`. Unbiased (Song et al. 2012; Nguyen et
    al. 2020, eq. 2), computed through U-centering, which equals the three-term formula

    .. math:: \frac{1}{n(n-3)}\left[\mathrm{tr}(\bar K \bar L)
       + \frac{1^\top \bar K 1\, 1^\top \bar L 1}{(n-1)(n-2)}
       - \frac{2}{n-2} 1^\top \bar K \bar L 1\right]

    (:math:`\bar K` is K with a zero diagonal) without its cancellation in float32.

    Args:
      gram_x: ``(n, n)`` Gram matrix.
      gram_y: ``(n, n)`` Gram matrix of the same n examples.
      debiased: the unbiased estimator (n >= 4).
    Returns:
      Scalar array.
    """
    unbiased = bool(debiased)
    k, l = _checked(gram_x, gram_y, unbiased, check_finite, grams=True)
    return _hsic(k, l, unbiased)


class GramSummary(NamedTuple):
    """A layer as its centered (or U-centered) Gram matrix and its squared norm."""

    vec: Array  # (n, n)
    self: Array  # <vec, vec>


def _gram_summary(k: Array, debiased: bool) -> GramSummary:
    kc = _center_gram(k, debiased)
    self = inner(kc, kc)
    if debiased:
        self = rounding_zero(self, safe_sqrt(inner(k, k)), squared=True)
    return GramSummary(kc, self)


def _cosine_pair(a: Any, b: Any, lower: float = -1.0) -> Array:
    """CKA of two prepared layers, in [lower, 1] (``lower``: 0 for the biased estimator,
    whose centered Grams are positive semi-definite; -1 for the unbiased one)."""
    return bounded_ratio(inner(a.vec, b.vec), _feature_route.norm_product(a, b), lower)


@functools.lru_cache(maxsize=None)
def linear_measure(*, debiased: bool = False, feature_space: bool = False) -> Measure:
    """Linear CKA as a :class:`Measure` (Gram route, or feature route when asked)."""
    min_n = 4 if debiased else 2
    if feature_space:
        return Measure(
            "linear_cka",
            functools.partial(_feature_route.feature_summary, debiased=debiased),
            functools.partial(_feature_route.feature_pair, debiased=debiased),
            min_n=min_n,
        )
    prepare = lambda x: _gram_summary(_gram_linear(unit_scaled(x)[0]), debiased)
    blocks = GramBlocks(
        functools.partial(_kernel_blocks.linear_source, debiased=debiased),
        functools.partial(_kernel_blocks.linear_block, debiased=debiased),
    )
    return Measure("linear_cka", prepare, cka_pair(debiased), blocks=blocks, min_n=min_n)


@functools.lru_cache(maxsize=None)
def cka_pair(debiased: bool) -> Callable[[Any, Any], Array]:
    """The pair step of CKA on prepared Grams, in its estimator's range."""
    return functools.partial(_cosine_pair, lower=-1.0 if debiased else 0.0)


@functools.lru_cache(maxsize=None)
def rbf_measure(*, threshold: float = 1.0, debiased: bool = False) -> Measure:
    """RBF CKA as a :class:`Measure`; in grids, its centered Grams are formed block by block
    from the features (see :class:`_kernel_blocks.RBFSource`)."""
    t = _v.positive(threshold, "threshold")
    prepare = lambda x: _gram_summary(_gram_rbf(x, jnp.asarray(t, x.dtype)), debiased)
    blocks = GramBlocks(
        functools.partial(_kernel_blocks.rbf_source, threshold=t, debiased=debiased),
        functools.partial(_kernel_blocks.rbf_block, threshold=t, debiased=debiased),
    )
    return Measure(
        "rbf_cka", prepare, cka_pair(debiased), blocks=blocks, min_n=4 if debiased else 2
    )


@functools.partial(jax.jit, static_argnames=("debiased",))
def _cka(k: Array, l: Array, debiased: bool) -> Array:
    return cka_pair(debiased)(_gram_summary(k, debiased), _gram_summary(l, debiased))


def cka(gram_x: Any, gram_y: Any, *, debiased: bool = False, check_finite: bool = True) -> Array:
    r"""Centered kernel alignment of two Gram matrices.

    .. math:: \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,
       \mathrm{HSIC}(L, L)}}

    Args:
      gram_x: ``(n, n)`` Gram matrix.
      gram_y: ``(n, n)`` Gram matrix of the same n examples.
      debiased: use the unbiased HSIC estimator (n >= 4); the result can then be slightly
        negative for unrelated representations.
    Returns:
      Scalar array; in [0, 1] for the biased form. 0 when either kernel is constant after
      centering (a zero-variance layer), where CKA is undefined.

    Precision: a Gram matrix of uncentered features carries their common offset in every
    entry, and centering it afterwards cancels that offset in the dtype's precision. In
    float32 (8 significant digits) activations with an offset of 1000 times their spread
    lose everything (``cka(gram_linear(x), gram_linear(y))`` is then off by ~0.2; by
    ~1e-4 at an offset of 100). For linear CKA use :func:`linear_cka`, which centers the
    features before forming any product; for other kernels, center (and scale) the
    features before building the Grams, or compute them in float64.
    """
    k, l = _checked(gram_x, gram_y, debiased, check_finite, grams=True)
    return _cka(k, l, debiased)


def linear_cka(
    x: Any, y: Any, *, debiased: bool = False, method: str = "auto", check_finite: bool = True
) -> Array:
    r"""Linear centered kernel alignment of two activation arrays.

    .. math:: \mathrm{CKA} = \frac{\lVert Y_c^\top X_c \rVert_F^2}
       {\lVert X_c^\top X_c \rVert_F\,\lVert Y_c^\top Y_c \rVert_F}

    with :math:`X_c, Y_c` the feature-centered activations; equal to
    ``cka(gram_linear(x), gram_linear(y), debiased=debiased)``.

    Args:
      x: activations, shape ``(n, ...)``, one row per example.
      y: activations, shape ``(n, ...)``, the same n examples in the same order.
      debiased: unbiased HSIC estimator (n >= 4).
      method: ``"gram"`` builds the two ``(n, n)`` Grams (cost ``n^2 (d1 + d2)``),
        ``"features"`` works with ``d x d`` products (cost ``n (d1 d2 + d1^2 + d2^2)``), no
        ``n x n`` matrix; ``"auto"`` picks the cheaper (:func:`_feature_route.use_feature_space`).
      check_finite: raise on NaN/inf (skipped automatically for traced values).
    Returns:
      Scalar array in [0, 1] (biased) in the inputs' floating dtype; 0 for a zero-variance
      input.
    References:
      Kornblith et al., Similarity of Neural Network Representations Revisited, ICML 2019.

    Example:
      >>> import jax, jaxsim
      >>> x = jax.random.normal(jax.random.key(0), (100, 10))
      >>> float(jaxsim.linear_cka(x, 2 * x))
      1.0
    """
    _v.choice(method, "method", ("auto", "gram", "features"))
    x, y = _checked(x, y, debiased, check_finite)
    feature_space = _feature_route.feature_route(
        method, x.shape[0], [x.shape[1]], [y.shape[1]], shards=_feature_route.example_shards((x, y))
    )
    return evaluate(linear_measure, x, y, debiased=debiased, feature_space=feature_space)


def rbf_cka(
    x: Any, y: Any, *, threshold: float = 1.0, debiased: bool = False, check_finite: bool = True
) -> Array:
    r"""CKA with RBF kernels: ``cka(gram_rbf(x, threshold=t), gram_rbf(y, threshold=t))``.

    Args:
      x: activations, shape ``(n, ...)``.
      y: activations of the same n examples, shape ``(n, ...)``.
      threshold: bandwidth as a fraction of the median squared distance (see
        :func:`gram_rbf`); > 0.
      debiased: unbiased HSIC estimator (n >= 4).
    Returns:
      Scalar array.
    """
    x, y = _checked(x, y, debiased, check_finite)
    return evaluate(
        rbf_measure, x, y, threshold=_v.positive(threshold, "threshold"), debiased=debiased
    )
