"""Progress bars for long loops: tqdm when it is installed, a plain counter otherwise."""

from __future__ import annotations

import sys
from typing import Callable, Iterable

# with ``progress=None`` a bar appears only once a loop has run this long
AUTO_DELAY_S = 3.0


def bar(iterable: Iterable, enabled: bool | None, total: int | None, desc: str) -> Iterable:
    """``iterable`` with a progress bar on stderr.

    ``enabled``: True always shows one (tqdm, or a plain counter without it); False never;
    None shows a tqdm bar only when the loop is still running after a few seconds.
    """
    if enabled is False:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(iterable, total, desc) if enabled else iterable
    delay = 0.0 if enabled else AUTO_DELAY_S
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, delay=delay)


def _plain(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    count = 0
    for count, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {count}" + (f"/{total}" if total else ""), end="", file=sys.stderr,
              flush=True)
    if count:
        print(file=sys.stderr)


def steps(enabled: bool | None, total: int, desc: str) -> tuple[Callable[[], None],
                                                              Callable[[], None]]:
    """``(advance, close)`` of a progress bar over ``total`` steps that are not the items of
    one loop (see :func:`bar` for ``enabled``)."""
    it = iter(bar(range(total), enabled, total, desc))
    next(it, None)  # the bar starts at 0 and each later request counts one finished step
    return (lambda: next(it, None) and None), it.close if hasattr(it, "close") else (lambda: None)
