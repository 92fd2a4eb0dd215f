"""A volume's history: snapshots, points in time, and the plans to restore,
clone or diff them.

A *point* is a seq: the state after segment `seq` was applied.  A snapshot
is a name bound to a seq (a small object, no data); `--at TIME` is the last
seq sealed at or before TIME.  The planning functions here are pure; the
doing (building a map at a point, copying data) is in the engine and CLI."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Callable, Iterable

import attrs

from lsbd import names
from lsbd.engine import checkpoint as ckpt
from lsbd.engine.config import VolumeConfig
from lsbd.engine.recovery import fetch_segment_index, store_segment_seqs
from lsbd.errors import ObjectExists, ObjectNotFound, PointUnavailable, UserError
from lsbd.store import Store

COPY_CHUNK = 4 * 1024 * 1024
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SnapshotExists(UserError, FileExistsError):
    pass


class SnapshotNotFound(UserError, FileNotFoundError):
    pass


BadPoint = PointUnavailable


@attrs.frozen(kw_only=True)
class Snapshot:
    name: str
    seq: int
    created: float
    volume_id: str

    def to_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()


def check_snapshot_name(name: str) -> str:
    if not _SNAPSHOT_NAME.match(name or ""):
        raise UserError(f"bad snapshot name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def write_snapshot(store: Store, config: VolumeConfig, name: str, seq: int) -> Snapshot:
    snap = Snapshot(name=check_snapshot_name(name), seq=seq, created=time.time(),
                    volume_id=config.volume_id)
    try:
        store.put(names.snapshot_key(config.name, name), snap.to_json(), exclusive=True)
    except ObjectExists:
        raise SnapshotExists(f"volume {config.name} already has a snapshot {name!r}") from None
    return snap


def read_snapshot(store: Store, config: VolumeConfig, name: str) -> Snapshot:
    check_snapshot_name(name)
    try:
        data = json.loads(store.get(names.snapshot_key(config.name, name)))
    except ObjectNotFound:
        raise SnapshotNotFound(f"volume {config.name} has no snapshot {name!r}") from None
    return Snapshot(**data)


def list_snapshots(store: Store, config: VolumeConfig) -> list[Snapshot]:
    out = []
    for info in store.list(names.snapshot_prefix(config.name)):
        name = info.key.rsplit("/", 1)[-1]
        try:
            out.append(read_snapshot(store, config, name))
        except (SnapshotNotFound, ValueError, TypeError):
            continue
    return sorted(out, key=lambda s: (s.seq, s.name))


def delete_snapshot(store: Store, config: VolumeConfig, name: str) -> None:
    read_snapshot(store, config, name)  # a clear error if it is not there
    store.delete(names.snapshot_key(config.name, name))


def create_clone(store: Store, source: VolumeConfig, name: str, seq: int, *, size: int,
                 cache_root: str) -> VolumeConfig:
    """A new writable volume whose first state is `source` at `seq`.  No data
    is copied: a checkpoint at `seq` pins the segments it uses, and a
    reference object tells the source's compaction that a clone needs them."""
    from lsbd.engine.compact import ensure_checkpoint_at
    from lsbd.engine.config import create_volume

    names.check_volume_name(name)
    if store.exists(names.config_key(name)):
        from lsbd.errors import VolumeExists

        raise VolumeExists(f"volume {name!r} already exists in {store.url}")
    ensure_checkpoint_at(store, source.name, seq, cache_root=cache_root)
    store.put(names.clone_ref_key(source.name, name),
              json.dumps({"clone": name, "seq": seq, "created": time.time()}).encode())
    parent = {"volume": source.name, "volume_id": source.volume_id, "seq": seq}
    return create_volume(store, name, size, block_size=source.block_size,
                         flush_mode=source.flush_mode, segment_size=source.segment_size,
                         seal_interval=source.seal_interval,
                         retain_seconds=source.retain_seconds, parent=parent)


def restore_volume(store: Store, source: VolumeConfig, seq: int, name: str, *, cache_root: str,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Create volume `name` holding `source`'s state at `seq`, as an independent
    copy (no shared segments).  Never overwrites: an existing `name` is refused
    before anything is written.  Returns the bytes of data copied."""
    from lsbd.engine.config import create_volume
    from lsbd.engine.volume import Volume

    names.check_volume_name(name)
    if store.exists(names.config_key(name)):
        from lsbd.errors import VolumeExists

        raise VolumeExists(f"volume {name!r} already exists: restore never overwrites; "
                           "choose another name")
    copied = 0
    with Volume.open(store, source.name, cache_root=cache_root, at_seq=seq) as src:
        create_volume(store, name, src.size, block_size=src.block_size,
                      flush_mode=source.flush_mode, segment_size=source.segment_size,
                      retain_seconds=source.retain_seconds)
        with Volume.open(store, name, cache_root=cache_root) as dst:
            offset = 0
            while offset < src.size:
                length = min(COPY_CHUNK, src.size - offset)
                for run in src.allocation(offset, length):
                    if run.allocated:
                        dst.write(run.offset, src.read(run.offset, run.length))
                        copied += run.length
                offset += length
                if progress:
                    progress(offset, src.size)
            dst.flush_to_store()
    return copied


def changed_between(store: Store, volume: str, old_seq: int, new_seq: int, *, cache_root: str
                    ) -> tuple[list[tuple[int, int]], int, int]:
    """Block ranges that differ between two points of a volume, with the block
    size and the size at the newer point."""
    from lsbd.engine.volume import Volume

    with Volume.open(store, volume, cache_root=cache_root, at_seq=old_seq) as old, \
            Volume.open(store, volume, cache_root=cache_root, at_seq=new_seq) as new:
        ranges = changed_ranges(old.extents(), new.extents(), block_size=new.block_size)
        return ranges, new.block_size, new.size


# --- points in time -----------------------------------------------------------

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None) -> float:
    """ISO 8601 ('2026-11-25T10:00', with or without a zone: local time if
    none), 'now', or relative to now ('-15m', '-2h', '-1d', '-30s')."""
    now = time.time() if now is None else now
    t = text.strip()
    if t == "now":
        return now
    m = _RELATIVE.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"bad time {text!r}: use ISO 8601 (2026-11-25T10:00:00) or a relative "
                        "time like -15m, -2h, -1d") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.timestamp()


def format_time(ns_or_s: float) -> str:
    """Local time, to the second: 2026-11-25 10:00:00."""
    seconds = ns_or_s / 1e9 if ns_or_s > 1e12 else ns_or_s
    return datetime.fromtimestamp(seconds, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def segment_times(store: Store, config: VolumeConfig) -> dict[int, int]:
    """seq -> sealed time (ns) of every segment of this volume still in the
    store: from the newest checkpoint's segment table, and from the trailers
    of the segments after it."""
    stored = store_segment_seqs(store, config.name)
    times: dict[int, int] = {}
    manifest = ckpt.newest_valid_checkpoint(store, config.name, config.volume_id)
    if manifest is not None:
        for info in ckpt.read_segments(store, manifest):
            if info.seq in stored:
                times[info.seq] = info.sealed_ns
    for seq in sorted(stored):
        if seq not in times:
            trailer, _records = fetch_segment_index(store, config.name, seq)
            times[seq] = trailer.sealed_ns
    return times


def seq_at(times: dict[int, int], when: float, *, created: float, now: float | None = None,
           floor: int = 0) -> int:
    """The last seq sealed at or before `when` (seconds); `floor` (a clone's
    base seq, else 0: the empty volume) when none was.  Pure."""
    now = time.time() if now is None else now
    if when < created:
        raise BadPoint(f"{format_time(when)} is before the volume was created "
                       f"({format_time(created)})")
    if when > now + 1:
        raise BadPoint(f"{format_time(when)} is in the future")
    when_ns = int(when * 1e9)
    best = floor
    for seq, sealed in times.items():
        if sealed <= when_ns and seq > best:
            best = seq
    return best


@attrs.frozen(kw_only=True)
class RestorePlan:
    target: int                 # the seq to reach
    checkpoint: int | None      # the checkpoint to start from (None: from the empty volume)
    segments: list[int]         # segments whose index is read and applied, in order
    index_bytes: int            # about how much metadata the plan reads

    def describe(self) -> list[str]:
        lines = [f"target seq {self.target:016x}"]
        lines.append(f"start from checkpoint {self.checkpoint:016x}" if self.checkpoint
                     else "start from the empty volume (no usable checkpoint)")
        if self.segments:
            lines.append(f"replay {len(self.segments)} segments {self.segments[0]:016x}.."
                         f"{self.segments[-1]:016x}")
        else:
            lines.append("replay no segments")
        return lines


def plan_restore(checkpoints: Iterable[int], segments: dict[int, int], target: int, *,
                 base: int = 0) -> RestorePlan:
    """Which checkpoint and segments rebuild the map at `target`.  Pure.

    `segments` maps seq -> object size; `base` is the first seq a clone owns
    minus one (a clone's earlier history is its parent's)."""
    if target < base:
        raise BadPoint(f"seq {target:016x} is before this volume's history starts")
    usable = [c for c in checkpoints if base <= c <= target]
    start = max(usable) if usable else base
    needed = list(range(start + 1, target + 1))
    missing = [s for s in needed if s not in segments]
    if missing:
        raise BadPoint(f"seq {target} can no longer be rebuilt: segment {missing[0]:016x} was "
                       "reclaimed (outside the retention window, and no snapshot keeps it)")
    # An index is at most a few per cent of its segment; reading the tail costs one GET.
    index_bytes = sum(min(segments[s], 64 * 1024) for s in needed)
    return RestorePlan(target=target, checkpoint=start if usable else None, segments=needed,
                       index_bytes=index_bytes)


def recoverable(checkpoints: Iterable[int], segments: Iterable[int], *, base: int = 0
                ) -> tuple[list[int], int, int]:
    """What history can still be rebuilt.  Pure.

    Returns (isolated points, window start, top): every seq in [window start,
    top] is recoverable (a checkpoint at or before it and every segment after
    it exist), and so is every isolated point (a checkpoint of its own, kept
    for a snapshot or a clone after compaction removed its neighbours)."""
    segs = set(segments)
    anchors = sorted({base} | {c for c in checkpoints if c >= base})
    # Each anchor (a checkpoint, or the base state) reaches forward as long as
    # the segments after it are unbroken.
    runs: list[tuple[int, int]] = []
    for a in anchors:
        end = a
        while end + 1 in segs:
            end += 1
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((a, end))
    start, top = runs[-1]
    isolated = [s for lo, hi in runs[:-1] for s in range(lo, hi + 1) if s > base or lo > base]
    return isolated, start, top


def changed_ranges(old: Iterable[tuple], new: Iterable[tuple], *,
                   block_size: int) -> list[tuple[int, int]]:
    """Block ranges [start, end) whose content may differ between two maps,
    each given as sorted, non-overlapping (lba, nblocks, seq, offset)
    extents.  Pure.

    A block differs when it is mapped in one and not the other, or mapped to
    a different place: a write after the older point always lands in a newer
    segment, so "same place" means "same data"."""
    a = [(lba, lba + n, seq, off) for lba, n, seq, off in old]
    b = [(lba, lba + n, seq, off) for lba, n, seq, off in new]
    cuts = sorted({x for r in a for x in r[:2]} | {x for r in b for x in r[:2]})
    out: list[tuple[int, int]] = []
    i = j = 0
    for lo, hi in zip(cuts, cuts[1:]):
        while i < len(a) and a[i][1] <= lo:
            i += 1
        while j < len(b) and b[j][1] <= lo:
            j += 1
        pa = _place(a[i] if i < len(a) else None, lo, block_size)
        pb = _place(b[j] if j < len(b) else None, lo, block_size)
        if pa != pb:
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
    return out


def _place(run: tuple | None, block: int, block_size: int) -> tuple[int, int] | None:
    """(seq, file offset) of `block` in a run, None if the run does not cover it."""
    if run is None or not run[0] <= block < run[1]:
        return None
    start, _end, seq, off = run
    return seq, off + (block - start) * block_size
