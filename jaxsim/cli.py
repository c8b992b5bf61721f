"""The ``jaxsim`` command line: similarity grids of layers stored in ``.npz`` files."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Sequence

import numpy as np

from jaxsim._progress import bar
from jaxsim._registry import METRICS

_EPILOG = f"""metrics: {", ".join(sorted(METRICS))}

example:
  jaxsim grid model_a.npz model_b.npz --metric linear_cka --out grid.npz --plot grid.png
each .npz holds one array per layer, axis 0 indexing the same examples in every file."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxsim")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsim",
        description="Layer-by-layer similarity of neural-network representations.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jaxsim {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "grid",
        help="compare every layer of A with every layer of B (or A)",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("a", help="npz file of the row layers")
    g.add_argument("b", nargs="?", help="npz file of the column layers (default: a self-grid of A)")
    g.add_argument(
        "--metric",
        default="linear_cka",
        choices=sorted(METRICS),
        help="similarity measure (default linear_cka)",
    )
    g.add_argument(
        "--out",
        help="save the grid to this .npz (values, rows, cols, metric); "
        "without it the grid is only printed",
    )
    g.add_argument("--plot", help="also save a heatmap (.png or .pdf)")
    g.add_argument(
        "--batch-size",
        type=int,
        help="minibatch CKA over batches of this many examples (linear CKA only; "
        "memory independent of the number of examples)",
    )
    g.add_argument(
        "--reduce",
        choices=["flatten", "average", "resize"],
        help="reduction of 4-D (n, h, w, c) layers: flatten (positions become "
        "examples), average (pool over positions) or resize (to the smallest "
        "h, w, then flatten); default: each example's h*w*c values are its "
        "features",
    )
    g.add_argument(
        "--layout",
        choices=["examples-first", "neurons-first"],
        default="examples-first",
        help="examples-first: axis 0 indexes the examples (default); "
        "neurons-first: 2-D arrays laid out (neurons, n), as google/svcca's",
    )
    g.add_argument("--debiased", action="store_true", help="unbiased HSIC estimator (CKA)")
    g.add_argument("--epsilon", type=float, help="CCA regularizer (mean_cca, svcca, pwcca)")
    g.add_argument("--keep-dims", type=int, help="SVCCA: directions kept per layer")
    g.add_argument("--keep-variance", type=float, help="SVCCA: fraction of variance kept")
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other option of the metric, e.g. --option alpha=0.5 "
        "--option compare=kendall (repeatable)",
    )
    g.add_argument("--x64", action="store_true", help="compute in float64")
    return parser


def _load(path: str, layout: str = "examples-first") -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ValueError(f"cannot read {path}: {reason}") from None
    if isinstance(loaded, np.ndarray):
        raise ValueError(
            f"{path}: holds a single array (.npy); jaxsim grid reads .npz files "
            "of one array per layer, e.g. np.savez('layers.npz', fc1=a, fc2=b)"
        )
    with loaded as f:
        layers = {k: f[k] for k in f.files}
    if not layers:
        raise ValueError(f"{path}: holds no arrays (expected one array per layer)")
    if layout == "neurons-first":
        for name, a in layers.items():
            if a.ndim != 2:
                raise ValueError(
                    f"--layout neurons-first: {name} has shape {a.shape}; only "
                    "2-D (neurons, n) arrays can be read so"
                )
        layers = {name: a.T for name, a in layers.items()}
    return layers


def _describe(path: str, layers: dict[str, np.ndarray]) -> str:
    """How each layer was read: a (neurons, n) file read examples-first shows at once."""
    lines = [f"{path}:"]
    for name, a in layers.items():
        features = int(np.prod(a.shape[1:])) if a.ndim > 1 else 1
        shape = f" ({' x '.join(map(str, a.shape[1:]))})" if a.ndim > 2 else ""
        lines.append(f"  {name}: {a.shape[0]} examples x {features} features{shape}")
    return "\n".join(lines)


def _options(args: argparse.Namespace) -> dict:
    opts = {}
    if args.debiased:
        opts["debiased"] = True
    for name in ("epsilon", "keep_dims", "keep_variance"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.reduce:
        opts["reduce"] = args.reduce
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--option: expected KEY=VALUE, got {item!r}")
        try:
            opts[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key.strip()] = value  # a bare word, e.g. compare=kendall
    return opts


def _minibatch(a: dict, b: dict | None, batch_size: int):
    import jaxsim

    n = len(next(iter(a.values())))
    if batch_size < 4:
        raise SystemExit("jaxsim: --batch-size must be at least 4 (unbiased HSIC)")
    state = jaxsim.minibatch_cka_init(len(a), None if b is None else len(b))
    starts = range(0, n - batch_size + 1, batch_size)  # equal batches: the paper's estimator
    for s in bar(starts, True, len(starts), "minibatch CKA"):
        part_a = [v[s : s + batch_size] for v in a.values()]
        part_b = None if b is None else [v[s : s + batch_size] for v in b.values()]
        state = jaxsim.minibatch_cka_update(state, part_a, part_b)
    return jaxsim.minibatch_cka_result(state, rows=list(a), cols=list(a if b is None else b))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    import jaxsim

    try:
        a = _load(args.a, args.layout)
        b = _load(args.b, args.layout) if args.b else None
        print(_describe(args.a, a))
        if b is not None:
            print(_describe(args.b, b))
        if args.batch_size:
            if args.metric not in ("linear_cka", "cka"):
                raise ValueError("--batch-size: minibatch streaming is linear CKA only")
            grid = _minibatch(a, b, args.batch_size)
        else:
            grid = jaxsim.similarity_grid(a, b, metric=args.metric, **_options(args))
    except (ValueError, TypeError) as err:
        print(f"jaxsim: {err}", file=sys.stderr)
        return 2
    print(grid)
    if args.out:
        print(f"saved {grid.save(args.out)}")
    else:
        print("(pass --out PATH to save the grid)")
    if args.plot:
        from jaxsim.plot import heatmap

        try:
            heatmap(grid).savefig(args.plot)
        except (ValueError, OSError) as err:
            print(f"jaxsim: --plot {args.plot}: {err}", file=sys.stderr)
            return 2
        print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
