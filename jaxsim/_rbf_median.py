"""The median of a layer's squared distances (the RBF bandwidth), by exact selection.

Non-negative floats order like their bit patterns read as integers, so the median is found
by counting passes over the patterns instead of a sort: over the whole matrix when it is
formed, or block by block (a radix selection) when it is not.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _distances


def bit_patterns(d: Array) -> Array:
    """Non-negative floats' bit patterns as integers, which order like the floats."""
    int_type = jnp.int64 if d.dtype == jnp.float64 else jnp.int32
    return jax.lax.bitcast_convert_type(jax.lax.stop_gradient(d), int_type)


def check_countable(n: int) -> None:
    """The bandwidth selections count distances in uint32: at most 2^32 - 1 of them."""
    if n * n >= 2**32:
        raise ValueError(
            f"RBF bandwidth: {n * n} squared distances (n = {n}) exceed the "
            "2^32 - 1 this selection counts; subsample the examples"
        )


SAMPLE = 1 << 16  # patterns sorted to bracket the median before the counting passes
MARGIN = 5.0  # the bracket's half-width, in standard deviations of a sample rank


def _sample_stride(m: int, n: int) -> int:
    """A stride through the n x n entries that takes about SAMPLE of them, coprime with n
    so that the sample is not the same few columns of every row."""
    stride = max(1, m // SAMPLE)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


@jax.custom_jvp
def _mean_of_patterns(flat: Array, lower: Array, upper: Array) -> Array:
    """The mean of the two values with these bit patterns; its derivative is the mean of
    the derivatives of the entries of ``flat`` equal to each (as through a sort)."""
    value = lambda p: jax.lax.bitcast_convert_type(p, flat.dtype)
    return (value(lower) + value(upper)) / 2


@_mean_of_patterns.defjvp
def _mean_of_patterns_jvp(primals, tangents):
    flat, lower, upper = primals
    bits = bit_patterns(flat)

    def mean_at(p):
        hit = bits == p
        count = jnp.maximum(jnp.sum(hit, dtype=jnp.uint32), 1).astype(flat.dtype)
        return jnp.sum(jnp.where(hit, tangents[0], 0)) / count

    return _mean_of_patterns(flat, lower, upper), (mean_at(lower) + mean_at(upper)) / 2


def median_of_non_negative(d: Array, nan: Array | None = None) -> Array:
    """``jnp.median(d)`` of an array of non-negative floats, by exact selection instead of a
    sort: non-negative floats order like their bit patterns read as integers. A sorted
    sample of the patterns brackets the median, and bisection on the pattern narrows the
    bracket, one fused compare-and-count pass per step (about 17 on realistic layers):
    far cheaper than the sort behind ``jnp.median``, and bit-for-bit the same value. The
    bisection itself proves the bracket held (its bottom was passed over, its top
    reached); when it did not (the bracket missed, or ties at its ends), the selection
    runs again over the whole range (at most 32 passes in float32, 64 in float64).

    The derivative flows to the entries equal to the median (as through a sort), and NaN
    propagates: ``nan`` says whether ``d`` holds one when the caller knows it more cheaply
    (from the features the distances come from); default, a pass over ``d``. Counts are
    uint32: at most 2^32 - 1 entries (an n x n matrix up to n = 65535, 17 GB in
    float32)."""
    flat = d.ravel()
    m = flat.size
    check_countable(d.shape[0])
    bits = bit_patterns(flat)
    int_type = bits.dtype
    no_pattern = jnp.iinfo(int_type).max  # above every finite pattern and +inf
    count = lambda mask: jnp.sum(mask, dtype=jnp.uint32)  # exact up to n = 65535
    k = (m - 1) // 2
    unknown = jnp.uint32(m + 1)  # no count at the top yet

    def halve(state):  # the k-th smallest pattern in [lo, hi]; at_hi counts <= hi
        lo, hi, at_hi, passed = state
        mid = lo + (hi - lo) // 2
        at_mid = count(bits <= mid)
        enough = at_mid >= k + 1
        return (jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi),
                jnp.where(enough, at_mid, at_hi), passed | ~enough)  # fmt: skip

    def select(lo, hi, at_hi):
        return jax.lax.while_loop(lambda s: s[0] < s[1], halve, (lo, hi, at_hi, lo == 0))

    sample = jnp.sort(bits[:: _sample_stride(m, d.shape[0])])
    s = sample.shape[0]
    width, rank = MARGIN * math.sqrt(s / 4) + 2, k * s / m
    bracket = (sample[max(0, int(rank - width))], sample[min(s - 1, math.ceil(rank + width))])
    lower, _, at_lower, passed = select(*bracket, unknown)
    everything = lambda: select(jnp.zeros((), int_type), no_pattern - 1, jnp.uint32(m))[:3:2]
    lower, at_lower = jax.lax.cond(
        passed & (at_lower != unknown), lambda: (lower, at_lower), everything
    )
    if m % 2:
        upper = lower
    else:  # the next value up: itself if it occurs twice, else the smallest one above it
        upper = jax.lax.cond(
            at_lower >= k + 2,
            lambda: lower,
            lambda: jnp.min(jnp.where(bits > lower, bits, no_pattern)),
        )
    nan = jnp.any(jnp.isnan(flat)) if nan is None else nan
    return jnp.where(nan, jnp.nan, _mean_of_patterns(flat, lower, upper))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def blockwise_median(xc: Array, sq: Array, n: int) -> Array:
    """The median of a layer's n^2 squared distances (zero diagonal included), the value
    :func:`median_of_non_negative` gives, found block by block without the n x n matrix:
    a radix selection on the bit pattern (non-negative floats order like their patterns),
    8 bits per pass (4 passes in float32, 8 in float64), each pass recomputing the
    distance blocks and counting the next 8 bits of the entries that share the prefix
    found so far. Memory O(b^2 + n d). The derivative is the mean of the derivatives of
    the entries equal to the median's two order statistics, as through a sort (the
    nearest entries, where a pass rounds the distances differently)."""
    lower, upper = median_patterns(xc, sq, n)
    value = lambda p: jax.lax.bitcast_convert_type(p, xc.dtype)
    return (value(lower) + value(upper)) / 2


def median_patterns(xc: Array, sq: Array, n: int) -> tuple[Array, Array]:
    """Bit patterns of the order statistics (n^2 - 1) // 2 and n^2 // 2 of the squared
    distances."""
    check_countable(n)
    b, r0, c0, weight = _distances.source_blocks(xc.shape[0])
    int_type = bit_patterns(xc[:0, 0]).dtype
    bits = jnp.iinfo(int_type).bits

    def level(step, state):  # one pass: the next 8 bits, below the prefix found so far
        prefix, k, _, _ = state
        shift = (bits - 8 * (step + 1)).astype(int_type)

        def count(hist, block):
            r, c, w = block
            d, real = _distances.source_distances(xc, sq, n, b, r, c)
            pattern = bit_patterns(d)
            real = real & ((step == 0) | ((pattern >> (shift + 8)) == prefix))
            digit = ((pattern >> shift) & 255).astype(jnp.int32)
            return hist.at[digit.ravel()].add(jnp.where(real, w, 0).ravel()), None

        hist, _ = jax.lax.scan(count, jnp.zeros(256, jnp.uint32), (r0, c0, weight))
        below = jnp.cumsum(hist)
        digit = jnp.argmax(below > k).astype(jnp.int32)
        k = k - jnp.where(digit > 0, below[digit - 1], 0)
        return (prefix << 8) | digit.astype(int_type), k, hist, digit

    start = (
        jnp.zeros((), int_type),
        jnp.asarray((n * n - 1) // 2, jnp.uint32),
        jnp.zeros(256, jnp.uint32),
        jnp.zeros((), jnp.int32),
    )
    prefix, k, hist, digit = jax.lax.fori_loop(0, bits // 8, level, start)
    lower = prefix
    if (n * n) % 2:
        return lower, lower
    # the next value up: the lower one again if it occurs once more, else the next
    # pattern counted in the last pass, else (none shares the prefix) the least above it
    later = jnp.arange(256) > digit
    following = jnp.argmax(later & (hist > 0))
    in_group = (prefix - digit.astype(int_type)) | following.astype(int_type)

    def least_above(_):
        def smallest(low, block):
            r, c, _ = block
            d, real = _distances.source_distances(xc, sq, n, b, r, c)
            pattern = bit_patterns(d)
            above = real & (pattern > lower)
            return jnp.minimum(low, jnp.min(jnp.where(above, pattern, low))), None

        return jax.lax.scan(
            smallest, jnp.asarray(jnp.iinfo(int_type).max, int_type), (r0, c0, weight)
        )[0]

    upper = jnp.where(
        k + 1 < hist[digit],
        lower,
        jax.lax.cond(jnp.any(later & (hist > 0)), lambda _: in_group, least_above, None),
    )
    return lower, upper


@blockwise_median.defjvp
def _blockwise_median_jvp(n, primals, tangents):
    xc, sq = primals
    lower, upper = median_patterns(xc, sq, n)
    b, r0, c0, weight = _distances.source_blocks(xc.shape[0])

    value = lambda p: jax.lax.bitcast_convert_type(p, xc.dtype)
    far = jnp.iinfo(lower.dtype).max

    # One pass finds the entries nearest each order statistic's pattern (those equal to
    # it, unless this pass rounds a distance differently from the selection's passes, as
    # a compiler that fuses each program differently can: an entry an ulp away would drop
    # half the derivative) and sums their derivatives, a running (gap, sum, count) reduction:
    # finding them in a pass of their own could round differently again.
    def nearest(carry, block):  # linear in the tangents (the selects' predicates known)
        gap, total, many = carry
        r, c, w = block
        d, d_dot, real = jax.jvp(
            lambda a, s: _distances.source_distances(a, s, n, b, r, c),
            primals,
            tangents,
            has_aux=True,
        )
        out = []
        for k, p in enumerate((lower, upper)):
            dist = jnp.where(real, jnp.abs(bit_patterns(d) - p), far)
            here = jnp.min(dist)
            hit = dist == here
            part = w.astype(d_dot.dtype) * jnp.sum(jnp.where(hit, d_dot, 0))
            count = w * jnp.sum(hit, dtype=jnp.uint32)
            closer, same = here < gap[k], here == gap[k]
            out.append(
                (
                    jnp.minimum(here, gap[k]),
                    jnp.where(closer, part, jnp.where(same, total[k] + part, total[k])),
                    jnp.where(closer, count, jnp.where(same, many[k] + count, many[k])),
                )
            )
        return tuple(jnp.stack(v) for v in zip(*out)), None

    start = (jnp.full(2, far, lower.dtype), jnp.zeros(2, xc.dtype), jnp.zeros(2, jnp.uint32))
    _, total, many = jax.lax.scan(nearest, start, (r0, c0, weight))[0]
    mean = total / jnp.maximum(many, 1).astype(xc.dtype)
    return (value(lower) + value(upper)) / 2, (mean[0] + mean[1]) / 2
