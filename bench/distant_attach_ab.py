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
import os, sys, time, json, subprocess, tempfile, shutil, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distant_bench import Moto, DelayProxy, sh, drop_caches, make_tree, MiB

ap = argparse.ArgumentParser()
ap.add_argument("--delay", type=float, default=10)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--small-mib", type=int, default=130)
ap.add_argument("--big-mib", type=int, default=256)
ap.add_argument("--read", action="store_true")
ap.add_argument("--log", action="store_true")
ap.add_argument("--moto-spill", action="store_true", help="see distant_bench.MOTO_IN_MEMORY")
ap.add_argument("exes", nargs="+")
a = ap.parse_args()
moto = Moto(spill=a.moto_spill)
proxy = DelayProxy(("127.0.0.1", moto.port), a.delay / 1000).start()
endpoint = f"http://127.0.0.1:{proxy.port}"
env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
           AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
moto.bucket("attach-bench")
work = tempfile.mkdtemp(prefix="distant-attach-")
env.pop("PYTHONDONTWRITEBYTECODE", None)
env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pyc")
src = os.path.join(work, "src"); os.makedirs(src)
make_tree(src, a.small_mib, a.big_mib)
mnt = os.path.join(work, "mnt"); os.makedirs(mnt)
fs = os.path.join(work, "fs"); os.makedirs(fs)
n = [0]
def lsbd(exe, *args):
    return sh(exe, "--store", "s3://attach-bench/d", "--cache-dir", os.path.join(work, f"cache{n[0]}"), *args, env=env)
try:
    for i, exe in enumerate(a.exes):
        vol = f"v{i}"
        lsbd(exe, "create", vol, "--size", "4G")
        lsbd(exe, "mount", vol, mnt)
        img = os.path.join(mnt, vol + ".img")
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", img)
        sh("mount", "-o", "loop", img, fs)
        sh("cp", "-a", src + "/.", fs); os.sync()
        sh("umount", fs); lsbd(exe, "umount", mnt)
    res = {exe: [] for exe in a.exes}
    for r in range(a.rounds):
        order = a.exes if r % 2 == 0 else a.exes[::-1]
        for exe in order:
            vol = f"v{a.exes.index(exe)}"
            n[0] += 1
            drop_caches(); moto.log()
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            lsbd(exe, "mount", vol, mnt)
            t1 = time.monotonic()
            img = os.path.join(mnt, vol + ".img")
            sh("mount", "-o", "loop,ro", img, fs)
            t2 = time.monotonic()
            t3 = t2
            if a.read:
                ok = sh("diff", "-r", "-q", "-x", "lost+found", src, fs, check=False).returncode == 0
                t3 = time.monotonic()
                assert ok, "diff"
            log = moto.log()
            sh("umount", fs); lsbd(exe, "umount", mnt)
            row = dict(attach=round(t1 - t0, 3), mount=round(t2 - t1, 3), read=round(t3 - t0, 3), load=round(load, 1))
            if a.log:
                row["reqs"] = [(round(s - t0, 3), round(e - t0, 3), k) for s, e, k, p, rg in sorted(log) if s < t1]
                row["whole"] = [(round(s - t0, 2), p[-2:]) for s, e, k, p, rg in sorted(log) if k == "GET seg"]
                row["late_ranged"] = [(round(s - t0, 2), p[-2:]) for s, e, k, p, rg in sorted(log) if k == "GET range seg" and s > t1]
            res[exe].append(row)
            print(exe, json.dumps(row), flush=True)
    for exe, rows in res.items():
        print(exe, "attach", sorted(x["attach"] for x in rows), "mount", sorted(x["mount"] for x in rows), "read", sorted(x["read"] for x in rows))
finally:
    for d in (fs, mnt):
        if os.path.ismount(d): sh("umount", "-l", d, check=False)
    proxy.stop(); moto.stop()
    shutil.rmtree(work, ignore_errors=True)
