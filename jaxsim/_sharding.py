"""Layers on a device mesh: which mesh they share, and the ring that pairs sharded rows."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _gram_route
from jaxsim._kernel_blocks import LinearSource
from jaxsim._measure import center_features, spec_axes, unit_scaled


def ring_axis(layers: Sequence[Any]) -> tuple[Any, str] | None:
    """``(mesh, axis)`` when every layer is a ``jax.Array`` sharded along its examples over
    the same single mesh axis (of size > 1, dividing n), features replicated; else None.

    Under ``jax.jit`` on auto mesh axes the layers' types name their mesh but not how
    they are sharded on it; there a mesh with a single axis of size > 1 (the layers', or
    else the one set with ``jax.set_mesh``) is taken as the data axis: the ring's
    ``shard_map`` takes each device's rows of the layers, without communication if they
    are already sharded so, by slicing if replicated."""
    if layers and all(
        isinstance(a, jax.core.Tracer)
        and not spec_axes(getattr(jax.typeof(a).sharding, "spec", ()))
        for a in layers
    ):
        mesh = layer_mesh(layers)
        if mesh is None:
            return None
        data = [k for k, v in mesh.shape.items() if v > 1]
        if (
            len(data) == 1
            and jax.sharding.AxisType.Explicit not in mesh.axis_types
            and layers[0].shape[0] % mesh.shape[data[0]] == 0
        ):
            return mesh, data[0]
        return None
    found = None
    for a in layers:
        # a traced layer carries its sharding in its type only on explicit mesh axes
        sharding = (
            jax.typeof(a).sharding
            if isinstance(a, jax.core.Tracer)
            else getattr(a, "sharding", None)
        )
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
        axis = spec[0][0] if isinstance(spec[0], tuple) and len(spec[0]) == 1 else spec[0]
        if not isinstance(axis, str) or any(p is not None for p in spec[1:]):
            return None
        if found is not None and found != (sharding.mesh, axis):
            return None
        found = (sharding.mesh, axis)
    size = None if found is None else found[0].shape[found[1]]
    if size is None or size < 2 or layers[0].shape[0] % size:
        return None
    return found


@functools.lru_cache(maxsize=32)
def ring_program(
    mesh: Any,
    axis: str,
    debiased: bool = False,
    rescale: bool = True,
    dtype: Any = None,
    num_a: int | None = None,
) -> Callable[[list[Array]], Array]:
    """The inner products of the centered (``debiased``: U-centered) linear Grams of layers
    sharded along examples over ``axis``, without gathering them: device p holds rows p
    of every layer and pairs them with rows p, p+1, ..., p + D/2 as they come round a ring
    (``ppermute``), each block pair once (the mirrored blocks by symmetry, weight 2), and
    the ``(L, L)`` sums are all-reduced. Per device ~``(D + 2) / (2 D)`` of one device's
    Gram products. ``rescale=False``: the activations' own units (minibatch CKA);
    ``dtype``: computed in it; ``num_a``: see :func:`_gram_route.slab_products`."""
    size = mesh.shape[axis]
    shift = [(j, (j - 1) % size) for j in range(size)]  # device p receives from p + 1

    def local(layers):
        layers = [x if dtype is None else x.astype(dtype) for x in layers]
        feats = [unit_scaled(x, axis)[0] if rescale else center_features(x, axis) for x in layers]
        m = feats[0].shape[0]
        count = jnp.asarray(m * size, feats[0].dtype)
        mine = []
        for f in feats:
            row_sq = jnp.sum(f * f, axis=1)
            mine.append(LinearSource(f, row_sq, jax.lax.psum(jnp.sum(row_sq), axis), count))
        b = _gram_route.block_size(m, len(feats))
        acc, theirs = (
            _gram_route.cross_products(mine, mine, b, debiased, same=True, num_a=num_a),
            mine,
        )
        for step in range(1, size // 2 + 1):
            theirs = [
                t._replace(
                    features=jax.lax.ppermute(t.features, axis, shift),
                    row_sq=jax.lax.ppermute(t.row_sq, axis, shift),
                )
                for t in theirs
            ]
            weight = 1.0 if 2 * step == size else 2.0
            acc = acc + weight * _gram_route.cross_products(mine, theirs, b, debiased, num_a=num_a)
        return jax.lax.psum(acc, axis)

    P = jax.sharding.PartitionSpec
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axis),), out_specs=P()))


def layer_mesh(layers: Sequence[Any]) -> Any | None:
    """The device mesh that every layer lives on, when it has more than one device: read
    from the layers' shardings (arrays placed with a ``NamedSharding``, replicated or
    sharded in any way; traced layers: the mesh in their types), or for traced layers
    whose types name none, the mesh set with ``jax.set_mesh``. None for host arrays,
    arrays on one device, and layers on different meshes."""
    found = None
    for a in layers:
        traced = isinstance(a, jax.core.Tracer)
        sharding = jax.typeof(a).sharding if traced else getattr(a, "sharding", None)
        mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        if traced and (mesh is None or mesh.empty):
            mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or (found is not None and mesh != found):
            return None
        found = mesh
    return found if found is not None and found.size > 1 else None
