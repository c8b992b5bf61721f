"""The ``jaxsim`` command line: similarity grids of layers stored in ``.npz`` files."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Sequence

import numpy as np

from jaxsim.grid import METRICS

_EPILOG = f"""metrics: {', '.join(sorted(METRICS))}

example:
  jaxsim grid model_a.npz model_b.npz --metric linear_cka --out grid.npz --plot grid.png
each .npz holds one array per layer, axis 0 indexing the same examples in every file."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsim", description="Layer-by-layer similarity of neural-network representations.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="compare every layer of A with every layer of B (or A)",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("a", help="npz file of the row layers")
    g.add_argument("b", nargs="?", help="npz file of the column layers (default: a self-grid of A)")
    g.add_argument("--metric", default="linear_cka", choices=sorted(METRICS),
                   help="similarity measure (default linear_cka)")
    g.add_argument("--out", default="grid.npz", help="output .npz (values, rows, cols, metric)")
    g.add_argument("--plot", help="also save a heatmap (.png or .pdf)")
    g.add_argument("--batch-size", type=int,
                   help="minibatch CKA over batches of this many examples (linear CKA only; "
                        "memory independent of the number of examples)")
    g.add_argument("--reduce", choices=["flatten", "average", "resize"],
                   help="reduction of 4-D (n, h, w, c) layers (default: flatten each example)")
    g.add_argument("--debiased", action="store_true", help="unbiased HSIC estimator (CKA)")
    g.add_argument("--epsilon", type=float, help="CCA regulariser (mean_cca, svcca, pwcca)")
    g.add_argument("--keep-dims", type=int, help="SVCCA: directions kept per layer")
    g.add_argument("--keep-variance", type=float, help="SVCCA: fraction of variance kept")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the metric, e.g. --option alpha=0.5 "
                        "--option compare=kendall (repeatable)")
    g.add_argument("--x64", action="store_true", help="compute in float64")
    return parser


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


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
    try:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="minibatch CKA", leave=False)
    except ImportError:
        pass
    for s in starts:
        part_a = [v[s:s + batch_size] for v in a.values()]
        part_b = None if b is None else [v[s:s + batch_size] for v in b.values()]
        state = jaxsim.minibatch_cka_update(state, part_a, part_b)
    return jaxsim.minibatch_cka_result(state, rows=list(a), cols=list(a if b is None else b))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.x64:
        import jax
        jax.config.update("jax_enable_x64", True)
    import jaxsim

    a = _load(args.a)
    b = _load(args.b) if args.b else None
    try:
        if args.batch_size:
            if args.metric not in ("linear_cka", "cka"):
                raise ValueError("--batch-size: minibatch streaming is linear CKA only")
            grid = _minibatch(a, b, args.batch_size)
        else:
            grid = jaxsim.similarity_grid(a, b, metric=args.metric, **_options(args))
    except (ValueError, TypeError) as err:
        print(f"jaxsim: {err}", file=sys.stderr)
        return 2
    grid.save(args.out)
    print(grid)
    print(f"saved {args.out}")
    if args.plot:
        from jaxsim.plot import heatmap

        heatmap(grid).savefig(args.plot, dpi=150)
        print(f"saved {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
