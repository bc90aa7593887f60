"""Progress bars on stderr: one switch for the whole process.

Library functions draw their bars through `disable` (tqdm's ``disable=``) or `wanted`: a bar shows where its
caller asked for one, and a bar left to tqdm shows on a terminal only. The command line sets the switch: on
(`progress_switch(True)`: those bars also when stderr is a pipe or a log file) or off (``--quiet``: none).
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

_SWITCH: list[bool | None] = [None]  # None: tqdm decides (a terminal); True: draw; False: --quiet


@contextlib.contextmanager
def progress_switch(on: bool | None) -> Iterator[None]:
    """Within this block every tokenbridge progress bar is drawn (True), none is (False), or each caller decides."""
    before, _SWITCH[0] = _SWITCH[0], on
    try:
        yield
    finally:
        _SWITCH[0] = before


def disable(requested: bool | None = None) -> bool | None:
    """tqdm's ``disable=`` for a bar its caller wants (True), does not want (False) or leaves to tqdm (None: a bar
    on a terminal only). The switch off (--quiet) hides every bar; on (the command line) draws the wanted ones and
    those left to tqdm, whatever stderr is."""
    if requested is False or _SWITCH[0] is False:
        return True
    if _SWITCH[0] is True:
        return False
    return None if requested is None else False


def wanted(requested: bool = False) -> bool:
    """For the ``progress: bool`` argument of a function that draws its own bar: ``requested``, unless the switch
    is off."""
    return bool(requested) and _SWITCH[0] is not False


def progress_option(fn: Any, requested: bool = False) -> dict[str, bool]:
    """``{"progress": ...}`` for calling ``fn`` (e.g. a family's ``sample``), or {} when ``fn`` takes no progress
    argument (a family need not draw bars)."""
    return {"progress": wanted(requested)} if "progress" in inspect.signature(fn).parameters else {}


def bar(iterable: Iterable | None = None, *, requested: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (rate and ETA when the total is known) that follows the switch."""
    return tqdm(iterable, disable=disable(requested), file=sys.stderr, dynamic_ncols=True, **kwargs)
