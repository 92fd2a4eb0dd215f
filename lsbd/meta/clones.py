"""Clone references: a small object under a volume for each clone made of
it, naming the seq the clone stands on.  While the clone exists, that point
of the source is pinned (meta/pins.py)."""

from __future__ import annotations

import json
import time
from typing import NamedTuple

from lsbd import names
from lsbd.errors import ObjectNotFound
from lsbd.store import Store


class CloneRef(NamedTuple):
    clone: str
    seq: int


def write_clone_ref(store: Store, source: str, clone: str, seq: int) -> None:
    store.put(names.clone_ref_key(source, clone),
              json.dumps({"clone": clone, "seq": seq, "created": time.time()}).encode())


def clone_refs(store: Store, source: str) -> list[CloneRef]:
    """The clone references of a volume that can be read (a clone may be
    gone since: see live_clone_refs)."""
    out = []
    for info in store.list(names.clone_prefix(source)):
        try:
            ref = json.loads(store.get(info.key))
            out.append(CloneRef(str(ref.get("clone", "")), int(ref["seq"])))
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            continue
    return out


def live_clone_refs(store: Store, source: str) -> list[CloneRef]:
    """The references whose clone still exists."""
    return [r for r in clone_refs(store, source) if store.exists(names.config_key(r.clone))]
