"""Progress bars for long loops: tqdm when it is installed, a plain counter otherwise."""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator

import jax

# with ``progress=None`` a bar appears only once a loop has run this long
AUTO_DELAY_S = 3.0


def _nothing() -> None:
    return None


def steps(
    enabled: bool | None, total: int | None, desc: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(advance, close)`` of a progress bar on stderr over ``total`` steps.

    ``enabled``: True always shows one (tqdm, or a plain counter without it); False never;
    None shows a tqdm bar only when the work is still running after a few seconds.
    """
    if enabled is False:
        return _nothing, _nothing
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(total, desc) if enabled else (_nothing, _nothing)
    shown = tqdm(
        total=total, desc=desc, leave=False, file=sys.stderr, delay=0.0 if enabled else AUTO_DELAY_S
    )
    return (lambda: shown.update(1) and None), shown.close


def _plain(total: int | None, desc: str) -> tuple[Callable[[], None], Callable[[], None]]:
    count = 0

    def advance():
        nonlocal count
        count += 1
        print(
            f"\r{desc}: {count}" + (f"/{total}" if total else ""),
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close():
        if count:
            print(file=sys.stderr)

    return advance, close


def bar(iterable: Iterable, enabled: bool | None, total: int | None, desc: str) -> Iterator:
    """``iterable`` with a progress bar (see :func:`steps` for ``enabled``)."""
    advance, close = steps(enabled, total, desc)
    try:
        for item in iterable:
            yield item
            advance()
    finally:
        close()


def ticker(
    enabled: bool | None, total: int, desc: str, traced: bool
) -> tuple[Callable[..., None], Callable[[], None]]:
    """``(tick, close)`` for a progress bar over ``total`` steps of a grid:
    ``tick(value, steps=1)`` waits for ``value`` (so that the bar follows the work, not its
    dispatch) and advances.
    No bar, and no waiting, when ``enabled`` is False or the layers are traced."""
    if traced:
        enabled = False
    advance, close = steps(enabled, total, desc)
    if enabled is False:
        return (lambda value, steps=1: None), close

    def tick(value, steps=1):
        jax.block_until_ready(value)
        for _ in range(steps):
            advance()

    return tick, close
