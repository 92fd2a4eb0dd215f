"""Settings shared by every command: which store, which cache dir, and how
to open a volume with them."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

from lsbd import linux, private
from lsbd.freedcap import FreedMemoryCap
from lsbd.errors import StoreError, UserError
from lsbd.store import Store, open_store, seal_store


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lsbd")


class Context:
    def __init__(self, *, store_url: str | None, endpoint_url: str | None, cache_dir: str | None,
                 key_file: str | None = None, passphrase_file: str | None = None,
                 create_store: bool = False, store_retry_within: float | None = None):
        self.store_url = store_url
        # None: every attempt at a failing request is made (a serving process);
        # else a request failing for this many seconds is given up.
        self.store_retry_within = store_retry_within
        self.create_store = create_store
        self.endpoint_url = endpoint_url
        self.cache_dir = cache_dir or os.environ.get("LSBD_CACHE_DIR") or default_cache_dir()
        self.key_file = key_file
        self.passphrase_file = passphrase_file
        self._store: Store | None = None
        self._plain_before_fork: Store | None = None   # see before_fork
        self._secret: Any = None
        self._configs: dict[str, Any] = {}

    @property
    def store(self) -> Store:
        """The store, with the wrapper that seals the segments and checkpoints
        of compressed or encrypted volumes (lsbd/crypto/store.py)."""
        if self._store is not None:
            return self._store
        if self._plain_before_fork is not None:
            # the serving process takes over the store its parent opened
            self._store = seal_store(self._plain_before_fork, self.secret)
        else:
            self._store = open_store(self.store_url, endpoint_url=self.endpoint_url,
                                     retry_within=self.store_retry_within,
                                     secret=self.secret, create=self.create_store)
        return self._store

    @property
    def plain_store(self) -> Store:
        """The store without the sealing wrapper (keys objects, raw bytes)."""
        return getattr(self.store, "inner", self.store)

    def secret(self, volume: str):
        """The passphrase or key file given for this run (asked for once)."""
        if self._secret is None:
            from lsbd.cli.secrets import current_secret

            self._secret = current_secret(key_file=self.key_file,
                                          passphrase_file=self.passphrase_file, volume=volume)
        return self._secret

    def volume_config(self, volume: str):
        """The settings of `volume` (lsbd.meta.config.VolumeConfig), read
        from the store once per command: opening a volume needs them in
        several places."""
        config = self._configs.get(volume)
        if config is None:
            from lsbd.meta.config import load_config

            config = self._configs[volume] = load_config(self.plain_store, volume)
        return config

    def cache_dir_error(self, e: OSError) -> str | None:
        """One line for an error met in the cache dir (or in making it) that
        names it and says how to choose another; None for an error elsewhere."""
        if not isinstance(e.filename, (str, bytes)) or not e.filename:
            return None
        path = os.path.abspath(os.fsdecode(e.filename))
        root = os.path.abspath(self.cache_dir)
        if os.path.commonpath([path, root]) not in (path, root):
            return None
        hint = "choose another with --cache-dir or $LSBD_CACHE_DIR"
        if os.path.exists(root) and not os.path.isdir(root):
            return f"the cache dir {self.cache_dir} is not a directory: {hint}"
        where = f" ({path})" if path.startswith(root + os.sep) else ""
        return f"cannot use the cache dir {self.cache_dir}{where}: {e.strerror or e}: {hint}"

    def check_cache_dir(self) -> None:
        """Make the cache dir and write a file in it: a process about to fork
        says now, in one line, that it cannot use it, rather than its forked
        serving process later."""
        try:
            private.make_dirs(self.cache_dir, fix_existing=False)
            fd, probe = tempfile.mkstemp(dir=self.cache_dir, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            e.filename = self.cache_dir     # not the probe's passing name
            raise UserError(self.cache_dir_error(e) or str(e)) from None

    def before_fork(self, volume: str, *, writer: bool,
                    beside: Callable[[], object] | None = None) -> None:
        """Before a serving process forks: read the volume's settings and get
        the passphrase of an encrypted volume (the forked process has no
        terminal), with a store opened and closed just for that (a process
        about to fork keeps no store).  The forked process inherits the
        settings read, and for a writer what the store answered about
        conditional writes (asked at the same time: a round trip less).
        It also takes over that store, its connections closed (none crosses
        the fork): its S3 client is built once, not again after the fork
        (15-40 ms of a serving process's start, before its first request).
        beside: work done in a thread while the store answers (the serving
        process's imports); an error in it is left for after the fork."""
        from concurrent.futures import ThreadPoolExecutor

        from lsbd.meta.config import load_config

        self.check_cache_dir()
        probe = open_store(self.store_url, endpoint_url=self.endpoint_url, seal=False,
                           retry_within=self.store_retry_within, create=self.create_store)
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                asked = pool.submit(lambda: probe.conditional_writes) if writer else None
                done = pool.submit(beside) if beside is not None else None
                config = self._configs[volume] = load_config(probe, volume)
                if asked is not None:
                    asked.exception()   # a failure: the serving process asks again
                if done is not None:
                    done.exception()    # a failure: the serving process meets it again
        finally:
            probe.close()
        self._plain_before_fork = probe
        if config.encryption:
            self.secret(volume)

    def keyring(self, volume: str):
        """The unlocked keys of an encrypted volume."""
        from lsbd.crypto import keystore

        return keystore.unlock(self.plain_store, volume, self.secret(volume))

    def unlock(self, volume: str) -> None:
        """Open the keys of `volume` and of the volumes it was cloned from
        now, before anything is written: a wrong passphrase is one clear
        error that changes nothing."""
        import attrs

        from lsbd.meta.config import Lineage

        for config in Lineage.load(self.plain_store, self.volume_config(volume)).chain:
            self.store.learn(config.name, attrs.asdict(config))  # type: ignore[attr-defined]  # open_store's SealingStore

    def key_given(self) -> bool:
        """Whether a passphrase or key file was given (not asked for)."""
        return bool(self.key_file or self.passphrase_file or os.environ.get("LSBD_PASSPHRASE"))

    def check_given_key(self, volume: str) -> None:
        """For a command a running writer may do with the keys it holds:
        none is asked for, but one given is checked against the volume's
        keys first, so a wrong one is refused, never silently ignored.
        An unreachable store cannot check it; the writer answers then."""
        if not self.key_given():
            return
        try:
            self.unlock(volume)
        except StoreError:
            pass

    def open_volume(self, name: str, *, read_only: bool = False, break_lease: bool = False,
                    flush_mode: str | None = None, **options):
        """Open a volume: a writer (lsbd.engine.volume.Volume) that serves
        compaction (auto_compact: also in the background), or a PastVolume."""
        from lsbd.engine.volume import Volume
        from lsbd.history import compactor

        self.unlock(name)
        auto = options.pop("auto_compact", False)
        vol = Volume.open(self.store, name, cache_root=self.cache_dir, read_only=read_only,
                          break_lease=break_lease, flush_mode=flush_mode,
                          config=self.volume_config(name), **options)
        if not vol.read_only:
            compactor.attach(vol, auto=auto)
        return vol

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


#: How long a thread that wants the GIL waits before the running one must
#: let go (Python's default is 5 ms).
SERVING_SWITCH_INTERVAL = 0.0005
#: glibc malloc settings of a serving process: freed memory below this much
#: stays in the process, and requests' buffers (up to 32 MiB) come from the
#: heap rather than a fresh mapping each.
SERVING_TRIM_THRESHOLD = 256 << 20
SERVING_MMAP_THRESHOLD = 64 << 20
#: ... in at most this many heaps ("arenas"; glibc's default is 8 per core,
#: and each thread that allocates gets its own until then).
SERVING_ARENA_MAX = 2
#: ... and above this much anonymous memory, the freed part is handed back
#: (lsbd.freedcap): what the process uses stays under #15's 256 MiB by its
#: bounded caches (docs/scale.md "Memory"), what it freed must not add to it.
SERVING_ANONYMOUS_CAP = 128 << 20
#: ... but not while a reader goes through segments fetched whole, up to
#: #15's 256 MiB (lsbd.freedcap: each fetch would page-fault its buffers anew).
SERVING_HOLD_CAP = 256 << 20
_cap: FreedMemoryCap | None = None


def tune_serving_process() -> None:
    """Tune a serving process (`serve`, `mount`).

    The GIL: request threads let go of it at every system call; with the
    default 5 ms interval the sealer, busy applying a segment to the map,
    then keeps it for up to 5 ms each time, and requests crawl while it
    works.  At 0.5 ms fio's 4 KiB random writes over NBD went from 27k to
    38-40k IOPS.

    Memory: every request allocates its payload (1 MiB for fio's sequential
    jobs), and by default glibc gives freed heap memory back to the kernel
    as soon as 2 MiB sit unused at a heap's top, so the next payload
    page-faults fresh zeroed pages in again.  Keeping up to 256 MiB
    (the NBD server's own limit of payload in flight) measured, over NBD
    with fio, alternating runs: 5-10% less server CPU per request;
    sequential writes 1262-1342 -> 1295-1463 MiB/s, sequential reads
    1714-1977 -> 1867-2134 MiB/s, 4 KiB random writes 41-44k -> 46-53k IOPS.
    But each heap keeps its own freed memory, and the NBD server's 32 I/O
    threads each got a heap of their own: after 2 GiB of random writes, 1 MiB
    reads of the fragmented region took the server's anonymous memory from
    81 to 209 MiB, 174 MiB in two heaps (at the same write and read speed).
    And what is kept stays resident: above SERVING_ANONYMOUS_CAP the freed
    part is handed back (lsbd.freedcap)."""
    sys.setswitchinterval(SERVING_SWITCH_INTERVAL)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    global _cap
    linux.mallopt(linux.M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)
    linux.mallopt(linux.M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
    linux.mallopt(linux.M_ARENA_MAX, SERVING_ARENA_MAX)
    if _cap is None:
        from lsbd.segments.held import any_held
        _cap = FreedMemoryCap(SERVING_ANONYMOUS_CAP, SERVING_TRIM_THRESHOLD,
                              hold=any_held, hold_cap=SERVING_HOLD_CAP).start()

