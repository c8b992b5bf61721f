"""The result of a grid: :class:`Grid`, values with the names of their layers."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array


class _Values:
    """What both results share: their ``values`` as NumPy, and saving to ``.npz``."""

    values: Array

    def to_numpy(self) -> np.ndarray:
        return np.asarray(self.values)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values, dtype=dtype)

    def _write(self, path: str, **fields: Any) -> str:
        """``values`` and ``fields`` to ``path`` (``.npz`` added when missing); returns
        the path written."""
        path = str(path)
        path = path if path.endswith(".npz") else path + ".npz"
        np.savez(path, values=self.to_numpy(), **fields)
        return path


def _strings(names: Any) -> np.ndarray:
    return np.array(names, dtype=str)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values"],
    meta_fields=["rows", "cols", "metric", "row_label", "col_label", "notes", "underdetermined"],
)
@dataclasses.dataclass(frozen=True)
class Grid(_Values):
    """Similarity of every row layer with every column layer (a pytree).

    Attributes:
      values: ``(len(rows), len(cols))`` array; ``values[i, j]`` compares row layer i (first
        argument of :func:`similarity_grid`) with column layer j.
      rows: names of the row layers.
      cols: names of the column layers.
      metric: the measure's name.
      row_label, col_label: what the row and column layers belong to (a model's name; by
        default the argument they came from), for titles and axis labels.
      notes: caveats about the values (e.g. CCA on too few examples per unit), shown by
        ``repr``.
      underdetermined: the positions of the row and of the column layers that CCA saw on
        fewer than 5 examples per unit (their cells' values are inflated); heatmaps mark
        them.
    """

    values: Array
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    metric: str = ""
    row_label: str = ""
    col_label: str = ""
    notes: tuple[str, ...] = ()
    underdetermined: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), len(self.cols))

    def __getitem__(self, key: tuple[str, str]) -> Array:
        """``grid["layer_a", "layer_b"]``: one value by layer names."""
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"Grid: index with two layer names, grid[row, col]; got {key!r}")
        return self.values[
            _position(self.rows, key[0], "row"), _position(self.cols, key[1], "column")
        ]

    def save(self, path: str) -> str:
        """Writes the grid (values, names, metric, labels) to an ``.npz`` file; returns the
        path written (numpy adds ``.npz`` when it is missing)."""
        return self._write(
            path,
            rows=_strings(self.rows),
            cols=_strings(self.cols),
            metric=np.array(self.metric),
            labels=_strings([self.row_label, self.col_label]),
            notes=_strings(self.notes),
            underdetermined_rows=np.array(self.underdetermined[0], dtype=np.int64),
            underdetermined_cols=np.array(self.underdetermined[1], dtype=np.int64),
        )

    @classmethod
    def load(cls, path: str) -> "Grid":
        with np.load(path) as f:
            labels = [str(v) for v in f["labels"]] if "labels" in f.files else ["", ""]
            notes = tuple(str(v) for v in f["notes"]) if "notes" in f.files else ()
            short = tuple(
                tuple(int(i) for i in f[k]) if k in f.files else ()
                for k in ("underdetermined_rows", "underdetermined_cols")
            )
            return cls(
                jnp.asarray(f["values"]),
                tuple(str(r) for r in f["rows"]),
                tuple(str(c) for c in f["cols"]),
                str(f["metric"]),
                labels[0],
                labels[1],
                notes,
                (short[0], short[1]),
            )

    def __repr__(self) -> str:
        values = self.to_numpy()
        head = f"Grid({self.metric or 'similarity'}, {values.shape[0]} x {values.shape[1]})"
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        if values.size > 400:
            return head + notes
        width = max([6] + [len(c) for c in self.cols])
        label = max([0] + [len(r) for r in self.rows])
        lines = [head, " " * label + "".join(f" {c:>{width}}" for c in self.cols)]
        for name, row in zip(self.rows, values):
            lines.append(f"{name:>{label}}" + "".join(f" {v:>{width}.4f}" for v in row))
        return "\n".join(lines) + notes


def _position(names: tuple[str, ...], name: Any, side: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(
            f"{name!r} is not a {side} layer of this grid; {side} layers: "
            f"{', '.join(map(repr, names))}"
        ) from None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values"],
    meta_fields=["models_a", "models_b", "rows", "cols", "metric", "row_label", "col_label",
                 "notes", "self_sweep"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True)
class SweepGrid(_Values):
    """Every layer of every model of one sweep against every layer of every model of
    another (or the same): ``similarity_grid(..., model_axis=...)`` (a pytree).

    Attributes:
      values: ``(M_a, M_b, L_a, L_b)`` array; ``values[i, j, k, l]`` compares layer k of
        model i (first argument) with layer l of model j.
      models_a, models_b: names of the models along the two model axes ("0", "1", ...
        unless given).
      rows, cols: names of the row and column layers.
      metric, row_label, col_label, notes: as in :class:`Grid`.
      self_sweep: one sweep against itself (``values[i, j]`` and ``values[j, i]`` are
        mirror images for a symmetric measure, ``values[i, i]`` is model i's own grid).
    """

    values: Array
    models_a: tuple[str, ...]
    models_b: tuple[str, ...]
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    metric: str = ""
    row_label: str = ""
    col_label: str = ""
    notes: tuple[str, ...] = ()
    self_sweep: bool = False

    @classmethod
    def from_grid(
        cls,
        grid: Grid,
        models_a: Any,
        models_b: Any = None,
        *,
        self_sweep: bool | None = None,
    ) -> "SweepGrid":
        """The sweep of a :class:`Grid` over all models' layers, ordered model by model
        (model 0's layers, then model 1's, ...: the order ``similarity_grid`` uses, and the
        way to stream a sweep through minibatch CKA). ``models_a``: their number or names;
        ``models_b``: likewise for the columns (default: the rows' models, a self-sweep).
        Layer names ``"model/layer"`` lose their model prefix."""
        names = lambda m: tuple(str(i) for i in range(m)) if isinstance(m, int) else tuple(m)
        models_a = names(models_a)
        same = models_b is None
        models_b = models_a if same else names(models_b)
        rows, cols = len(grid.rows), len(grid.cols)
        if rows % len(models_a) or cols % len(models_b):
            raise ValueError(
                f"grid: {rows} x {cols} layers do not divide into {len(models_a)} x "
                f"{len(models_b)} models"
            )
        l_a, l_b = rows // len(models_a), cols // len(models_b)
        strip = lambda n, m: n[len(m) + 1 :] if n.startswith(f"{m}/") else n
        values = grid.values.reshape(len(models_a), l_a, len(models_b), l_b)
        return cls(
            values.transpose(0, 2, 1, 3),
            models_a,
            models_b,
            tuple(strip(n, models_a[0]) for n in grid.rows[:l_a]),
            tuple(strip(n, models_b[0]) for n in grid.cols[:l_b]),
            grid.metric,
            grid.row_label,
            grid.col_label,
            grid.notes,
            same if self_sweep is None else self_sweep,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.models_a), len(self.models_b), len(self.rows), len(self.cols))

    def save(self, path: str) -> str:
        """Writes the sweep (values, model and layer names, metric, labels) to an ``.npz``
        file; returns the path written."""
        return self._write(
            path,
            models_a=_strings(self.models_a),
            models_b=_strings(self.models_b),
            rows=_strings(self.rows),
            cols=_strings(self.cols),
            metric=np.array(self.metric),
            labels=_strings([self.row_label, self.col_label]),
            notes=_strings(self.notes),
            self_sweep=np.array(self.self_sweep),
        )

    @classmethod
    def load(cls, path: str) -> "SweepGrid":
        with np.load(path) as f:
            names = lambda k: tuple(str(v) for v in f[k])
            labels = names("labels")
            return cls(
                jnp.asarray(f["values"]),
                names("models_a"),
                names("models_b"),
                names("rows"),
                names("cols"),
                str(f["metric"]),
                labels[0],
                labels[1],
                names("notes"),
                bool(f["self_sweep"]),
            )

    def pair(self, model_a: int | str, model_b: int | str) -> Grid:
        """The layer grid of one pair of models (by position or name), as a :class:`Grid`."""
        i = _model_index(self.models_a, model_a, "models_a")
        j = _model_index(self.models_b, model_b, "models_b")
        label = lambda side, names, k: f"{side} {names[k]}" if side else f"model {names[k]}"
        return Grid(
            self.values[i, j],
            self.rows,
            self.cols,
            self.metric,
            label(self.row_label, self.models_a, i),
            label(self.col_label, self.models_b, j),
            self.notes,
        )

    def __repr__(self) -> str:
        m_a, m_b, l_a, l_b = self.shape
        head = (
            f"SweepGrid({self.metric or 'similarity'}, {m_a} x {m_b} models, {l_a} x {l_b} layers)"
        )
        return head + "".join(f"\nnote: {n}" for n in self.notes)


def _model_index(names: tuple[str, ...], key: Any, side: str) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if -len(names) <= key < len(names):
            return int(key) % len(names)
        raise IndexError(f"{side}: model {key} out of range for {len(names)} models")
    return _position(names, key, side.replace("models_", "model of side "))
