"""Naming a point in a volume's history: a snapshot, a seq, a time, and the
one-word form used by diff and export --from: NAME (a snapshot), #N or
seq:N, @TIME, or live.  A seq is written in decimal (20) or in hex marked
0x (0x14): lsbd prints seqs in decimal everywhere."""

from __future__ import annotations

import tempfile
import time

from lsbd.errors import UserError, VolumeExists
from lsbd.history.report import newest_seq
from lsbd.meta.config import VolumeConfig
from lsbd.meta.snapshots import read_snapshot
from lsbd.names import check_volume_name, config_key
from lsbd.plans.restore import BadPoint, RestorePlan, parse_time, plan_restore, seq_at
from lsbd.segments.checkpoints import list_checkpoints
from lsbd.segments.remote import segment_times, store_segment_seqs
from lsbd.store import Store


def parse_seq(text: str) -> int:
    """A seq as lsbd prints it: decimal (20), or hex marked 0x (0x14).
    Anything that could be read two ways is refused, never guessed."""
    t = text.strip()
    if t[:2].lower() == "0x":
        try:
            return int(t[2:], 16)
        except ValueError:
            raise UserError(f"bad seq {text!r}: 0x must be followed by hex digits") from None
    if t.isdecimal() and t.isascii():
        if len(t) > 1 and t.startswith("0"):
            raise UserError(f"ambiguous seq {text!r}: seqs are decimal; write {int(t)} for "
                            f"decimal, or 0x{t.lstrip('0') or '0'} for hex")
        return int(t)
    if t and all(c in "0123456789abcdefABCDEF" for c in t):
        raise UserError(f"bad seq {text!r}: seqs are decimal; a hex seq needs 0x (0x{t})")
    raise UserError(f"bad seq {text!r}: a decimal number, e.g. 20 (or hex with 0x)")


def resolve(store: Store, config: VolumeConfig, *, snapshot: str | None = None,
            seq: int | None = None, at: str | None = None) -> int | None:
    """The seq a point names, or None if none was named (the live state)."""
    if snapshot is not None:
        return read_snapshot(store, config, snapshot).seq
    if seq is not None:
        top = newest_seq(store, config)
        if seq < 0 or seq > top:
            raise BadPoint(f"volume {config.name} has no seq {seq} (its newest is {top})")
        return _recoverable(store, config, seq)
    if at is not None:
        when = parse_time(at)
        times = segment_times(store, config)
        found = seq_at(times, when, created=config.created, now=time.time(),
                       floor=config.base_seq)
        if found == config.base_seq and times and config.base_seq + 1 not in times:
            # The segments sealed before `when` are gone: which state it was is unknown.
            raise BadPoint(f"{at}: that state can no longer be rebuilt: its history was "
                           "reclaimed (outside the retention window, and no snapshot keeps it)")
        return _recoverable(store, config, found)
    return None


def _recoverable(store: Store, config: VolumeConfig, seq: int) -> int:
    """`seq`, if its state can still be rebuilt (compaction may have removed
    it): a checkpoint at or before it, every segment after that checkpoint,
    and every segment that checkpoint's map uses.  A checkpoint can outlive
    the segments its map uses (one kept as the base of a newer incremental
    checkpoint), so the last is checked on the map itself."""
    if seq <= config.base_seq:
        return seq
    stored = store_segment_seqs(store, config.name)
    plan = plan_restore(list_checkpoints(store, config.name), stored, seq, base=config.base_seq)
    if plan.checkpoint is not None:
        missing = _missing_segments(store, config, plan.checkpoint, stored)
        if missing is not None:
            raise BadPoint(f"seq {seq} can no longer be rebuilt: segment {missing} was "
                           "reclaimed (outside the retention window, and no snapshot keeps it)")
    return seq


def _missing_segments(store: Store, config: VolumeConfig, checkpoint: int,
                      stored: dict[int, int]) -> int | None:
    """A segment of this volume that the map at `checkpoint` uses and the
    store no longer has, or None (the map is read as the engine opens it)."""
    from lsbd.engine.volume import Volume

    with tempfile.TemporaryDirectory(prefix="lsbd-point-") as scratch, \
            Volume.open(store, config.name, cache_root=scratch, at_seq=checkpoint) as past:
        for extent in past.extents():
            if extent.seq > config.base_seq and extent.seq not in stored:
                return extent.seq
    return None


def resolve_word(store: Store, config: VolumeConfig, word: str) -> int:
    """NAME (snapshot), #N / seq:N, @TIME, or 'live'."""
    if word == "live":
        return newest_seq(store, config)
    if word.startswith("#"):
        return resolve(store, config, seq=parse_seq(word[1:]))
    if word.startswith("seq:"):
        return resolve(store, config, seq=parse_seq(word[4:]))
    if word.startswith("@"):
        return resolve(store, config, at=word[1:])
    return resolve(store, config, snapshot=word)


def plan_restore_to(store: Store, config: VolumeConfig, target: int, new_name: str
                    ) -> RestorePlan:
    """The plan to restore `config`'s state at `target` as volume `new_name`
    (which checkpoint, which segments); refused when `new_name` exists:
    restore never overwrites."""
    check_volume_name(new_name)
    plan = plan_restore(list_checkpoints(store, config.name), store_segment_seqs(store, config.name),
                        target, base=config.base_seq)
    if store.exists(config_key(new_name)):
        raise VolumeExists(f"volume {new_name!r} already exists: restore never overwrites; "
                           "choose another name")
    return plan
