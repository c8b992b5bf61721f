"""Progress bars for long loops: tqdm when it is installed, a plain counter otherwise."""

from __future__ import annotations

import sys
from typing import Iterable


def bar(iterable: Iterable, enabled: bool, total: int | None, desc: str) -> Iterable:
    """``iterable`` with a progress bar on stderr (none when ``enabled`` is false)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


def _plain(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    count = 0
    for count, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {count}" + (f"/{total}" if total else ""), end="", file=sys.stderr,
              flush=True)
    if count:
        print(file=sys.stderr)
