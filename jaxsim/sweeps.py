"""What papers print about a sweep: corresponding layers across models, layer
identification, and similarity within against across models.

Each function reads a :class:`~jaxsim.SweepGrid` (``similarity_grid(..., model_axis=0)``)
whose ``values[i, j, k, l]`` compares layer k of model i with layer l of model j. Model
pairs are every ``(i, j)`` of a cross sweep, and every ``i != j`` of a self-sweep (a model
against itself says nothing about seeds). All are jit-able functions of the values.

References:
  Kornblith, Norouzi, Lee & Hinton, Similarity of neural network representations
  revisited, ICML 2019 (layer identification across initializations).
  Nguyen, Raghu & Kornblith, Do wide and deep networks learn the same things?, ICLR 2021
  (block structure within and across seeds).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim._result import Grid, SweepGrid

__all__ = [
    "Corresponding",
    "Identification",
    "corresponding_layers",
    "layer_identification",
    "within_across",
]


class Corresponding(NamedTuple):
    """Similarity of each layer with the same layer of the other models.

    Attributes:
      layers: the layer names.
      mean: ``(L,)`` mean over model pairs of ``values[i, j, l, l]``.
      std: ``(L,)`` their standard deviation (0 with one pair).
      pairs: ``(P, L)`` the values themselves, one row per model pair.
    """

    layers: tuple[str, ...]
    mean: Array
    std: Array
    pairs: Array


class Identification(NamedTuple):
    """Kornblith et al.'s layer identification.

    Attributes:
      accuracy: ``()`` fraction of (model pair, layer) whose most similar layer in the
        other model is the corresponding one.
      per_layer: ``(L,)`` that fraction for each layer.
      layers: the layer names.
    """

    accuracy: Array
    per_layer: Array
    layers: tuple[str, ...]


def _model_pairs(sweep: SweepGrid) -> tuple[np.ndarray, np.ndarray]:
    m_a, m_b = len(sweep.models_a), len(sweep.models_b)
    i, j = np.meshgrid(np.arange(m_a), np.arange(m_b), indexing="ij")
    keep = (i != j) if sweep.self_sweep else np.ones_like(i, bool)
    if not keep.any():
        raise ValueError(
            f"sweep: a self-sweep of {m_a} model(s) has no pair of distinct models; "
            "sweep at least two"
        )
    return i[keep], j[keep]


def _check(sweep: SweepGrid, name: str) -> None:
    if not isinstance(sweep, SweepGrid):
        hint = (
            " (a single model pair's Grid: pass similarity_grid(..., model_axis=0)'s result)"
            if isinstance(sweep, Grid)
            else ""
        )
        raise TypeError(f"sweep: expected a SweepGrid, got {type(sweep).__name__}{hint}")
    if len(sweep.rows) != len(sweep.cols):
        raise ValueError(
            f"{name}: corresponding layers need the same number of layers on both sides; "
            f"got {len(sweep.rows)} row and {len(sweep.cols)} column layers"
        )


def corresponding_layers(sweep: SweepGrid) -> Corresponding:
    """Cross-model similarity of corresponding layers (layer l of model i with layer l of
    model j), per layer, over every pair of distinct models: how reproducible each
    layer's representation is across seeds (or widths, or checkpoints).

    Args:
      sweep: a :class:`~jaxsim.SweepGrid` with as many row as column layers.
    Returns:
      :class:`Corresponding` (mean, std and the values per model pair).
    """
    _check(sweep, "corresponding_layers")
    i, j = _model_pairs(sweep)
    diag = jnp.diagonal(sweep.values[i, j], axis1=1, axis2=2)  # (P, L)
    return Corresponding(sweep.rows, jnp.mean(diag, 0), jnp.std(diag, 0), diag)


def layer_identification(sweep: SweepGrid) -> Identification:
    """Kornblith et al. (2019)'s test: for each pair of distinct models and each layer of
    the first, is the most similar layer of the second the corresponding one? A measure
    that identifies layers across random initializations scores near 1 (linear CKA did
    on their CIFAR-10 CNNs; CCA and SVCCA less so).

    Args:
      sweep: a :class:`~jaxsim.SweepGrid` with as many row as column layers.
    Returns:
      :class:`Identification`: overall and per-layer accuracy. Ties go to the first
      most similar layer.
    """
    _check(sweep, "layer_identification")
    i, j = _model_pairs(sweep)
    best = jnp.argmax(sweep.values[i, j], axis=-1)  # (P, L): most similar column layer
    hits = best == jnp.arange(len(sweep.rows))
    return Identification(jnp.mean(hits), jnp.mean(hits, axis=0), sweep.rows)


def within_across(sweep: SweepGrid) -> tuple[Grid, Grid]:
    """Layer-by-layer similarity within a model (mean over models of its own grid) and
    across models (mean over pairs of distinct models): Nguyen et al.'s comparison of a
    model's block structure with what other seeds share of it.

    Args:
      sweep: a self-sweep (``similarity_grid(acts, model_axis=0)``).
    Returns:
      ``(within, across)``, two :class:`~jaxsim.Grid` of shape ``(L, L)``.
    """
    if not isinstance(sweep, SweepGrid) or not sweep.self_sweep:
        raise ValueError(
            "sweep: within_across needs a self-sweep (similarity_grid(acts, model_axis=0) "
            "with no second sweep)"
        )
    m = len(sweep.models_a)
    idx = np.arange(m)
    within = jnp.mean(sweep.values[idx, idx], axis=0)
    i, j = _model_pairs(sweep)
    across = jnp.mean(sweep.values[i, j], axis=0)
    grid = lambda v, how: Grid(
        v, sweep.rows, sweep.cols, sweep.metric, f"{how} ({m} models)", f"{how} ({m} models)"
    )
    return grid(within, "within a model"), grid(across, "across models")
