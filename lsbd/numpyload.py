"""numpy for the hot paths that can do without it, loaded in the background.

Decoding a segment's index is 50x faster with numpy when its records are
one-block writes (lsbd.format.segment.index_of_footer), but importing numpy
takes 0.12 s of CPU with its files in the page cache and 0.37 s from a
dropped one.  A volume opened on a new cache dir from the map summary
(lsbd.segments.summary) decodes no index with numpy, so the first read of a
cold volume (the ext4 mount's superblock) was the one that imported it, and
waited 0.13-0.24 s for that (docs/distant.md).  `loaded()` answers at
once: numpy if it is imported, else None, and it starts the import in a
thread of its own; the caller then takes its path without numpy.  Only a
caller that numpy would speed up asks: an index of one-block records
(lsbd.format.segment), and a compressed or encrypted volume's layouts once
many frames were summed without it (lsbd.crypto.objects); and a map
opens without it while none of its segments is staged (lsbd.map.staged).
A cold read of files written in large pieces so never loads it: at its
attach the import held up the open for 0.07-0.1 s, and ran beside the
map's build and the first fetches (docs/operations.md, "A distant store").
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

log = logging.getLogger(__name__)

_lock = threading.Lock()
_numpy: ModuleType | None = None
_started = False


def loaded() -> ModuleType | None:
    """numpy if its import has finished; else None, having started it in
    the background (once per process)."""
    global _started
    if _numpy is not None:
        return _numpy
    with _lock:
        if not _started:
            _started = True
            threading.Thread(target=_load, name="lsbd-numpy", daemon=True).start()
    return None


def imported() -> ModuleType | None:
    """numpy if its import has finished, else None; never starts it."""
    return _numpy


def _forked() -> None:
    """A child forked after its parent asked but before numpy came: the
    thread is not here, so the child starts its own when it first asks.
    (A serving process forks before the engine starts threads, lsbd.cli.cmd_mount: a
    child forked while the import runs could find numpy's import lock held.)"""
    global _started, _lock
    if _numpy is None:
        _started = False
        _lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _load() -> None:
    global _numpy
    try:
        import numpy
    except Exception as e:  # noqa: BLE001 - only a speed-up: callers go on without it
        log.warning("numpy could not be loaded (%s): indexes are decoded without it", e)
        return
    _numpy = numpy
