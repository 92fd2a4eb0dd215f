"""Keys objects in the store: `volumes/<vol>/keys/<generation>`.

Each change writes the next generation with a conditional create (two
concurrent changes: one fails and nothing is lost), then deletes the older
ones, so an old passphrase stops working as soon as the change is made (a
copy of an older keys object kept elsewhere still opens with it: see
docs/security.md).  Readers take the newest generation.
"""

from __future__ import annotations

from lsbd import names
from lsbd.crypto import keyring as kr
from lsbd.errors import CorruptionError, ObjectExists, ObjectNotFound, UserError
from lsbd.store.base import Store


class KeysMissing(UserError, FileNotFoundError):
    """An encrypted volume whose keys object is gone."""


def generations(store: Store, volume: str) -> list[int]:
    found = (names.parse_keys_key(info.key) for info in store.list(names.keys_prefix(volume)))
    return sorted(g for g in found if g is not None)


def load(store: Store, volume: str) -> kr.Locked:
    """The newest keys object of `volume`, parsed but not unlocked."""
    for generation in reversed(generations(store, volume)):
        key = names.keys_key(volume, generation)
        try:
            data = store.get(key)
        except ObjectNotFound:
            continue              # deleted by a change running now: take the next
        locked = kr.decode(data, where=key)
        if locked.generation != generation:
            raise kr.KeysDamaged(f"{key}: holds generation {locked.generation}")
        return locked
    raise KeysMissing(f"volume {volume} is encrypted but its keys object "
                      f"({names.keys_prefix(volume)}...) is missing: it cannot be opened")


def unlock(store: Store, volume: str, secret: kr.Secret) -> kr.Keyring:
    locked = load(store, volume)
    return kr.unlock(locked, secret, where=names.keys_key(volume, locked.generation))


def save(store: Store, volume: str, ring: kr.Keyring) -> None:
    """Write `ring` as the next generation, then delete the older ones."""
    key = names.keys_key(volume, ring.generation)
    try:
        store.put(key, kr.encode(ring), exclusive=True)
    except ObjectExists:
        raise UserError(f"the keys of {volume} were changed at the same time elsewhere; "
                        "nothing was changed here, try again") from None
    for generation in generations(store, volume):
        if generation < ring.generation:
            store.delete(names.keys_key(volume, generation))


def copy(store: Store, source: str, target: str) -> None:
    """Give volume `target` the keys of `source` (a clone or a restored copy
    opens with the same passphrases, and reads `source`'s objects)."""
    locked = load(store, source)
    store.put(names.keys_key(target, locked.generation),
              store.get(names.keys_key(source, locked.generation)), exclusive=True)


def keys_in_use(store: Store, volume: str) -> dict[int, int]:
    """Data key id -> how many of the volume's stored objects were sealed
    with it (read from each object's tail: no passphrase needed)."""
    from lsbd.crypto.objects import TAIL, decode_tail

    counts: dict[int, int] = {}
    for prefix in (names.segment_prefix(volume), names.checkpoint_prefix(volume)):
        for info in store.list(prefix):
            if names.sealed_volume(info.key) is None:
                continue
            try:
                tail = decode_tail(store.get(info.key, -TAIL.size), where=info.key)
            except (ObjectNotFound, CorruptionError):
                continue
            if tail.encrypted:
                counts[tail.key_id] = counts.get(tail.key_id, 0) + 1
    return counts


def stale_segments(store: Store, volume: str, current: int) -> frozenset[int]:
    """Seqs of the volume's own segments sealed with a data key other than `current`."""
    from lsbd.crypto.objects import TAIL, decode_tail

    stale = set()
    for info in store.list(names.segment_prefix(volume)):
        seq = names.parse_seq(info.key)
        if seq is None:
            continue
        try:
            tail = decode_tail(store.get(info.key, -TAIL.size), where=info.key)
        except (ObjectNotFound, CorruptionError):
            continue
        if tail.encrypted and tail.key_id != current:
            stale.add(seq)
    return frozenset(stale)


def check_structure(store: Store, volume: str) -> tuple[int, list[str]]:
    """Without any key: every sealed object of the volume has a whole tail
    whose checksum holds and whose lengths fit the object.  Returns (objects
    checked, problems, each naming the object)."""
    from lsbd.crypto import linked
    from lsbd.crypto.objects import LINKED_VERSION, TAIL, decode_tail

    checked, problems = 0, []
    for prefix in (names.segment_prefix(volume), names.checkpoint_prefix(volume)):
        for info in store.list(prefix):
            if names.sealed_volume(info.key) is None:
                continue
            checked += 1
            try:
                tail = decode_tail(store.get(info.key, -TAIL.size), where=info.key)
            except CorruptionError as e:
                problems.append(str(e))
                continue
            if tail.version == LINKED_VERSION:
                # Sealed by link: header, body, a tag a frame and the tail, exactly.
                size = linked.stored_size(tail.plain_length, tail.frame_size)
                if info.size != size:
                    problems.append(f"{info.key}: {info.size} bytes, not the {size} its "
                                    "tail says")
                continue
            # Every frame has a 24-byte header and a tag or CRC of 4 bytes at least.
            least = TAIL.size + tail.index_length + 28 * tail.frame_count
            if info.size < least:
                problems.append(f"{info.key}: {info.size} bytes, too short for its "
                                f"{tail.frame_count} frames")
    return checked, problems
