"""The README's tour runs as written, top to bottom: its commands are taken
from README.md and run in one shell, with a local store, a temporary cache
dir and temporary mount points (and a free port for the NBD server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from fuse_helpers import REPO, is_mounted, require_fuse


def tour_commands() -> list[str]:
    """The lines of the first shell block under '## A tour' in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## A tour"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_content(a: Path, b: Path) -> bool:
    """Two (sparse) files read the same: compared where either holds data."""
    if a.stat().st_size != b.stat().st_size:
        return False
    ranges = []
    for path in (a, b):
        with open(path, "rb") as f:
            fd, size, pos = f.fileno(), a.stat().st_size, 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                ranges.append((start, end))
                pos = end
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            for off in range(start, end, 8 << 20):
                n = min(8 << 20, end - off)
                if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                    return False
    return True


def test_the_readme_tour_runs_as_written(tmp_path):
    require_fuse("nbdinfo", "qemu-img")
    lines = tour_commands()
    assert lines[0].startswith(". .venv/bin/activate") and any("lsbd mount" in ln for ln in lines)
    port = _free_port()
    mnt_lsbd, mnt_vm1 = tmp_path / "mnt-lsbd", tmp_path / "mnt-vm1"
    script = []
    for line in lines:
        line = line.replace(". .venv/bin/activate", f". {REPO}/.venv/bin/activate")
        line = line.replace("/mnt/lsbd", str(mnt_lsbd)).replace("/mnt/vm1", str(mnt_vm1))
        line = line.replace("127.0.0.1:10809", f"127.0.0.1:{port}")
        line = line.replace("lsbd serve vm1 &", f"lsbd serve vm1 --port {port} &")
        script.append(line)
    env = {**os.environ, "LSBD_STORE": f"file://{tmp_path}/store",
           "LSBD_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    try:
        proc = subprocess.run(["bash", "-e", "-x", "-c", "\n".join(script)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    finally:
        if is_mounted(mnt_vm1):
            subprocess.run(["umount", "-l", str(mnt_vm1)], check=False)
        if is_mounted(mnt_lsbd):
            subprocess.run([str(REPO / ".venv/bin/lsbd"), "umount", "--lazy", str(mnt_lsbd)],
                           env=env, check=False, timeout=120)
    assert "Traceback" not in proc.stderr
    # What the tour made is there.
    assert (tmp_path / "vm1.qcow2").stat().st_size > 0
    assert _same_content(tmp_path / "old.raw", tmp_path / "copy.raw")
    listed = subprocess.run([str(REPO / ".venv/bin/lsbd"), "list", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert sorted(v["name"] for v in json.loads(listed.stdout)) == ["vm1", "vm1-old", "vm1-test"]
    info = json.loads(subprocess.run([str(REPO / ".venv/bin/lsbd"), "info", "vm1", "--json"],
                                     env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert info["stored_bytes"] > 10 << 20 and info["writer"] is None
    shutil.rmtree(tmp_path / "store", ignore_errors=True)


def test_the_tour_is_found():
    """The extraction itself: a README without the block would fail here."""
    lines = tour_commands()
    assert len(lines) > 20 and all(not ln.startswith("```") for ln in lines)
