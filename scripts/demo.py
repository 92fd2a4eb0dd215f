"""`make demo`: the main job, end to end, on a local-directory store.

Creates a volume, mounts it with FUSE, makes ext4 on the image, writes and
reads files, checkpoints, throws the cache dir away, mounts again from the
store alone, and serves the volume over NBD to show its allocation map.
Everything lives under ./demo-data (delete it to start over)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "demo-data")
LSBD = os.path.join(os.path.dirname(sys.executable), "lsbd")
ENV = dict(os.environ, LSBD_STORE=f"file://{DATA}/store", LSBD_CACHE_DIR=f"{DATA}/cache")
VOLUME = "demo"
FUSE_MNT = os.path.join(DATA, "image")
EXT4_MNT = os.path.join(DATA, "files")


def step(text: str) -> None:
    print(f"\n\033[1;36m==> {text}\033[0m", flush=True)


def sh(*cmd: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, env=ENV, text=True, capture_output=quiet)
    if check and result.returncode != 0:
        if quiet:
            sys.stdout.write(result.stdout + result.stderr)
        sys.exit(f"demo: '{' '.join(cmd)}' failed ({result.returncode})")
    return result


def lsbd(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh(LSBD, *args, **kw)


def cleanup() -> None:
    subprocess.run(["umount", EXT4_MNT], capture_output=True)
    subprocess.run([LSBD, "umount", FUSE_MNT], env=ENV, capture_output=True)
    subprocess.run(["fusermount3", "-u", "-z", FUSE_MNT], capture_output=True)


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def write_files() -> dict[str, str]:
    os.makedirs(os.path.join(EXT4_MNT, "docs"), exist_ok=True)
    with open(os.path.join(EXT4_MNT, "big.bin"), "wb") as f:
        f.write(os.urandom(48 << 20))
    for i in range(200):
        with open(os.path.join(EXT4_MNT, "docs", f"note-{i:03d}.txt"), "w") as f:
            f.write(f"note {i}: a disk that lives in an object store\n" * (i + 1))
    shutil.copytree(os.path.join(ROOT, "lsbd"), os.path.join(EXT4_MNT, "source"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tree_digests(EXT4_MNT)


def tree_digests(top: str) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, top)] = digest(path)
    out.pop("lost+found", None)
    return out


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it loop-mounts an ext4 file system)")
    cleanup()
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(FUSE_MNT)
    os.makedirs(EXT4_MNT)
    image = os.path.join(FUSE_MNT, f"{VOLUME}.img")
    try:
        step("create a 1 GiB volume in a local-directory store (no cloud account needed)")
        lsbd("create", VOLUME, "--size", "1G")
        lsbd("list")

        step("mount it with FUSE: the volume appears as one image file")
        lsbd("mount", VOLUME, FUSE_MNT)
        sh("ls", "-l", FUSE_MNT)

        step("make ext4 on the image and loop-mount it")
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", image)
        sh("mount", "-o", "loop", image, EXT4_MNT)

        step("write files: a 48 MiB random file, 200 notes and a copy of lsbd's source")
        t0 = time.monotonic()
        before = write_files()
        sh("sync")
        print(f"wrote {len(before)} files in {time.monotonic() - t0:.1f}s")
        sh("df", "-h", EXT4_MNT)

        step("take a snapshot while mounted (free: no data is copied), then change files")
        lsbd("snapshot", "create", VOLUME, "first")
        shutil.rmtree(os.path.join(EXT4_MNT, "docs"))
        with open(os.path.join(EXT4_MNT, "big.bin"), "r+b") as f:
            f.write(os.urandom(1 << 20))
        sh("sync")
        sh("ls", EXT4_MNT)
        changed = tree_digests(EXT4_MNT)
        lsbd("snapshot", "list", VOLUME)

        step("unmount everything; lsbd uploads what is left and checkpoints the map")
        sh("umount", EXT4_MNT)
        lsbd("umount", FUSE_MNT)
        lsbd("info", VOLUME)

        step("lose the local machine: delete the cache dir, mount again from the store alone")
        shutil.rmtree(os.path.join(DATA, "cache"))
        lsbd("mount", VOLUME, FUSE_MNT)
        sh("mount", "-o", "loop,ro", image, EXT4_MNT)
        after = tree_digests(EXT4_MNT)
        same = changed == after
        print(f"{len(after)} files read back: "
              + ("\033[1;32mall byte-identical\033[0m" if same else "\033[1;31mDIFFERENT\033[0m"))
        sh("umount", EXT4_MNT)
        sh("e2fsck", "-fn", image, quiet=True)
        print("e2fsck -fn: clean")
        lsbd("umount", FUSE_MNT)
        if not same:
            return 1

        step("the snapshot still holds the files as they were: export it and look inside")
        snap_image = os.path.join(DATA, "first.img")
        lsbd("diff", VOLUME, "--from", "first", quiet=True)
        lsbd("export", VOLUME, snap_image, "--snapshot", "first")
        sh("mount", "-o", "loop,ro,noload", snap_image, EXT4_MNT)
        old = tree_digests(EXT4_MNT)
        sh("umount", EXT4_MNT)
        print(f"snapshot 'first': {len(old)} files, "
              + ("\033[1;32mexactly as they were\033[0m" if old == before
                 else "\033[1;31mDIFFERENT\033[0m"))
        os.unlink(snap_image)
        if old != before:
            return 1

        step("serve the same volume over NBD and ask an NBD client for its allocation map")
        if shutil.which("nbdinfo"):
            sock = os.path.join(DATA, "nbd.sock")
            server = subprocess.Popen([LSBD, "serve", VOLUME, "--socket", sock, "--read-only"],
                                      env=ENV)
            try:
                for _ in range(100):
                    if os.path.exists(sock):
                        break
                    time.sleep(0.1)
                sh("nbdinfo", f"nbd+unix:///{VOLUME}?socket={sock}")
                sh("nbdinfo", "--map", "--totals", f"nbd+unix:///{VOLUME}?socket={sock}")
            finally:
                server.terminate()
                server.wait(30)

        step("scrub: read every segment back from the store and check every checksum")
        lsbd("verify", VOLUME)
        print("\n\033[1;32mdemo finished\033[0m: data in", DATA)
        return 0
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
