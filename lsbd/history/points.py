"""Naming a point in a volume's history: a snapshot, a seq, a time, and the
one-word form used by diff and export --from: NAME (a snapshot), #N or
seq:N, @TIME, or live.  A seq is written in decimal (20) or in hex marked
0x (0x14): lsbd prints seqs in decimal everywhere."""

from __future__ import annotations

import time

from lsbd.errors import UserError, VolumeExists
from lsbd.history.report import newest_seq
from lsbd.meta.config import VolumeConfig
from lsbd.meta.snapshots import check_snapshot_name, read_snapshot
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
    it): a checkpoint at or before it and every segment after that.  (A
    checkpoint kept only under a newer incremental one may have lost the
    segments its map uses: opening the point refuses that.)"""
    if seq <= config.base_seq:
        return seq
    plan_restore(list_checkpoints(store, config.name), store_segment_seqs(store, config.name),
                 seq, base=config.base_seq)
    return seq


def check_word(word: str) -> str:
    """`word`, if it is written as a point (resolve_word), before any store
    is asked: a bad seq, time or snapshot name."""
    if word.startswith("#"):
        parse_seq(word[1:])
    elif word.startswith("seq:"):
        parse_seq(word[4:])
    elif word.startswith("@"):
        parse_time(word[1:])
    elif word != "live":
        check_snapshot_name(word)
    return word


def resolve_word(store: Store, config: VolumeConfig, word: str) -> int:
    """NAME (snapshot), #N / seq:N, @TIME, or 'live'."""
    if word == "live":
        return newest_seq(store, config)
    if word.startswith("#"):
        seq = resolve(store, config, seq=parse_seq(word[1:]))
    elif word.startswith("seq:"):
        seq = resolve(store, config, seq=parse_seq(word[4:]))
    elif word.startswith("@"):
        seq = resolve(store, config, at=word[1:])
    else:
        seq = resolve(store, config, snapshot=word)
    assert seq is not None  # a point was named
    return seq


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
