"""A serving process keeps freed heap for its request buffers; the
whole-segment buffers of a cold read must not stay in it once let go."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import threading, time
    from lsbd.cli.context import tune_serving_process
    from lsbd.segments.held import HeldSegments

    def anonymous_mib():
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) >> 10

    tune_serving_process()
    held = HeldSegments(limit=64 << 20, idle=0.2)

    def fetch(first):
        for seq in range(first, first + 3):
            body = b"x" * (32 << 20)        # a GET's body
            segment = body + b"!"           # and the segment made from it
            del body
            held.add(seq, segment)
            del segment
            held.installed(seq)

    before = anonymous_mib()
    threads = [threading.Thread(target=fetch, args=(n * 10,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 10
    while held and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)                        # the last timer's trim
    print(before, anonymous_mib(), bool(held))
""")


def test_anonymous_memory_falls_back_once_fetched_segments_are_let_go():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    before, after, still_held = int(out[0]), int(out[1]), out[2] == "True"
    assert not still_held
    # 12 segments of 32 MiB went through four threads; without a trim the
    # process kept well over 200 MiB of them.
    assert after - before < 48, (before, after)


def test_a_segment_read_after_its_copy_is_installed_is_let_go_once_idle():
    import time

    from lsbd.segments.held import HeldSegments

    held = HeldSegments(idle=0.2)
    held.add(1, b"x" * 4096)
    assert held.installed(1)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:       # a reader going on past the timer
        assert held.get(1) is not None
        time.sleep(0.02)
    time.sleep(0.6)
    assert 1 not in held
