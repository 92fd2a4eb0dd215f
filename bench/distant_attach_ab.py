"""The cold read of bench/distant_bench.py alone, for comparing versions of
lsbd (#17): each lsbd executable given (another checkout's .venv/bin/lsbd)
writes the same tree into a volume of its own; then, for --rounds rounds,
each in turn (the order reversed every other round), a cold `lsbd mount`
on a new cache dir with the page cache dropped, the ext4 mount and, with
--read, `diff -r` of the tree.  --log adds each round's store requests
(times from the start of `lsbd mount`).  Needs root, like distant_bench.

    sudo .venv/bin/python bench/distant_attach_ab.py --rounds 4 --read --log \
        NEW/.venv/bin/lsbd OLD/.venv/bin/lsbd
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distant_bench import DelayProxy, Moto, drop_caches, make_tree, sh

BUCKET = "attach-bench"


class Bench:
    """The tree, the mount points and a cache dir per cold mount, under one
    temporary directory, against one moto behind the delaying proxy."""

    def __init__(self, moto: Moto, endpoint: str, args):
        self.args = args
        self.moto = moto
        self.work = tempfile.mkdtemp(prefix="distant-attach-")
        self.env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                        AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        # Each lsbd compiles its own bytecode here, as an installed one has it.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = os.path.join(self.work, "pyc")
        self.src = self._dir("src")
        self.mnt = self._dir("mnt")
        self.fs = self._dir("fs")
        self.mounts = 0     # a new cache dir for every cold mount
        make_tree(self.src, args.small_mib, args.big_mib)

    def _dir(self, name: str) -> str:
        path = os.path.join(self.work, name)
        os.makedirs(path)
        return path

    def lsbd(self, exe: str, *args: str):
        cache = os.path.join(self.work, f"cache{self.mounts}")
        return sh(exe, "--store", f"s3://{BUCKET}/d", "--cache-dir", cache, *args, env=self.env)

    def image(self, vol: str) -> str:
        return os.path.join(self.mnt, vol + ".img")

    def write_tree(self, exe: str, vol: str) -> None:
        self.lsbd(exe, "create", vol, "--size", "4G")
        self.lsbd(exe, "mount", vol, self.mnt)
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", self.image(vol))
        sh("mount", "-o", "loop", self.image(vol), self.fs)
        sh("cp", "-a", self.src + "/.", self.fs)
        os.sync()
        self.unmount(exe)

    def unmount(self, exe: str) -> None:
        sh("umount", self.fs)
        self.lsbd(exe, "umount", self.mnt)

    def cold_read(self, exe: str, vol: str) -> dict:
        """One cold mount on a new cache dir: its times, and with --log its
        store requests."""
        self.mounts += 1
        drop_caches()
        self.moto.log()     # forget the requests before this one
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        self.lsbd(exe, "mount", vol, self.mnt)
        attached = time.monotonic()
        sh("mount", "-o", "loop,ro", self.image(vol), self.fs)
        mounted = read = time.monotonic()
        if self.args.read:
            same = sh("diff", "-r", "-q", "-x", "lost+found", self.src, self.fs,
                      check=False).returncode == 0
            read = time.monotonic()
            assert same, "the tree read back differs"
        log = sorted(self.moto.log())
        self.unmount(exe)
        row = {"attach": round(attached - t0, 3), "mount": round(mounted - attached, 3),
               "read": round(read - t0, 3), "load": round(load, 1)}
        if self.args.log:
            row["reqs"] = [(round(s - t0, 3), round(e - t0, 3), kind)
                           for s, e, kind, _path, _range in log if s < attached]
            row["whole"] = [(round(s - t0, 2), path[-2:])
                            for s, _e, kind, path, _range in log if kind == "GET seg"]
            row["late_ranged"] = [(round(s - t0, 2), path[-2:])
                                  for s, _e, kind, path, _range in log
                                  if kind == "GET range seg" and s > attached]
        return row

    def close(self) -> None:
        for d in (self.fs, self.mnt):
            if os.path.ismount(d):
                sh("umount", "-l", d, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=10, help="one-way delay, ms")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small-mib", type=int, default=130)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--read", action="store_true", help="diff the tree after each mount")
    ap.add_argument("--log", action="store_true", help="each round's store requests")
    ap.add_argument("--moto-spill", action="store_true", help="see distant_bench.MOTO_IN_MEMORY")
    ap.add_argument("exes", nargs="+", help="lsbd executables to compare")
    args = ap.parse_args()
    moto = Moto(spill=args.moto_spill)
    proxy = DelayProxy(("127.0.0.1", moto.port), args.delay / 1000).start()
    bench = None
    try:
        moto.bucket(BUCKET)
        bench = Bench(moto, f"http://127.0.0.1:{proxy.port}", args)
        vols = {exe: f"v{i}" for i, exe in enumerate(args.exes)}
        for exe, vol in vols.items():
            bench.write_tree(exe, vol)
        rows: dict[str, list[dict]] = {exe: [] for exe in args.exes}
        for r in range(args.rounds):
            for exe in args.exes if r % 2 == 0 else args.exes[::-1]:
                row = bench.cold_read(exe, vols[exe])
                rows[exe].append(row)
                print(exe, json.dumps(row), flush=True)
        for exe, done in rows.items():
            print(exe, *(f"{k} {sorted(x[k] for x in done)}" for k in ("attach", "mount", "read")))
    finally:
        if bench is not None:
            bench.close()
        proxy.stop()
        moto.stop()


if __name__ == "__main__":
    main()
