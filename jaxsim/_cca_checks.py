"""Checks of the CCA family's inputs: examples per unit, and SVCCA's ``keep_dims``."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

from jax import Array

# google/svcca's tutorial ("How many datapoints?"): "pick the number of datapoints to be
# at least a few times larger than the number of neurons", because with few examples per
# unit CCA finds correlations in noise (unrelated layers score near 1).
EXAMPLES_PER_UNIT = 5


class UnderdeterminedWarning(UserWarning):
    """CCA on fewer examples than a few per unit: canonical correlations are inflated."""


def examples_note(n: int, widths: dict[str, int]) -> str | None:
    """The under-determined-CCA message for n examples and the units CCA sees per layer
    (the width, or SVCCA's keep_dims), or None when n is at least EXAMPLES_PER_UNIT times
    every one of them."""
    short = {k: w for k, w in widths.items() if n < EXAMPLES_PER_UNIT * w}
    if not short:
        return None
    name, width = max(short.items(), key=lambda kv: kv[1])
    every = ", ".join(f"{k} ({w})" for k, w in short.items())
    note = (
        f"{name}: CCA on n={n} examples for {width} units (fewer than "
        f"{EXAMPLES_PER_UNIT} per unit, google/svcca's advice; {len(short)} layer(s) so: "
        f"{every}): canonical correlations are inflated toward 1, on unrelated layers "
        f"too. Use more examples, svcca with keep_dims <= {max(1, n // EXAMPLES_PER_UNIT)}, "
        "reduce='average' for conv layers in grids (channels as units), or CKA "
        "(linear_cka), which needs no more examples than units"
    )
    if all(n < w for w in widths.values()):
        note += (
            "; if the arrays are laid out (neurons, n) as in google/svcca, pass their "
            "transposes (x.T)"
        )
    return note


def warn_examples(n: int, widths: dict[str, int], warn: bool, stacklevel: int = 3) -> str | None:
    """Warns (once per call) when CCA is under-determined; returns the note."""
    note = examples_note(n, widths)
    if note and warn:
        warnings.warn(
            note + ". Pass warn=False to silence this warning.",
            UnderdeterminedWarning,
            stacklevel=stacklevel,
        )
    return note


def check_keep_dims(
    keep_dims: int | None, named: dict[str, Array], cap_keep_dims: bool = False
) -> None:
    """keep_dims must fit every layer (at most min(n, features) directions exist), unless
    capped to each layer's."""
    if keep_dims is None:
        return
    if keep_dims < 1:
        raise ValueError(f"keep_dims: expected at least 1 direction, got {keep_dims}")
    if cap_keep_dims:
        return
    for name, a in named.items():
        limit = min(a.shape)
        if keep_dims > limit:
            raise ValueError(
                f"keep_dims: {keep_dims} directions requested but {name} has shape "
                f"{tuple(a.shape)}, which has at most min(n, features) = {limit}; pass "
                f"cap_keep_dims=True to keep min(keep_dims, min(n, features)) directions of "
                f"each layer"
            )


CCA_METRICS = ("mean_cca", "svcca", "pwcca")


def grid_caveats(
    metric: str,
    options: Mapping[str, Any],
    named: Mapping[str, Array],
    layers_a: Sequence[Array],
    layers_b: Sequence[Array],
    warn: bool,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]]:
    """A CCA-family grid's ``(notes, underdetermined)`` (see :class:`jaxsim.Grid`): the
    under-determined note, warned once, and the positions of the row and column layers
    with fewer than EXAMPLES_PER_UNIT examples per unit. ``named``: every layer of the
    grid by its argument name; SVCCA's keep_dims is checked against each."""
    if metric == "svcca":
        check_keep_dims(
            options.get("keep_dims"), dict(named), bool(options.get("cap_keep_dims", False))
        )
    if metric not in CCA_METRICS:
        return (), ((), ())
    keep = options.get("keep_dims") if metric == "svcca" else None
    units = lambda a: a.shape[1] if keep is None else min(keep, a.shape[1])
    n = layers_a[0].shape[0]
    note = warn_examples(n, {k: units(a) for k, a in named.items()}, warn, stacklevel=4)
    few = lambda layers: tuple(i for i, a in enumerate(layers) if n < EXAMPLES_PER_UNIT * units(a))
    return ((note,) if note else ()), (few(layers_a), few(layers_b))
