"""A segment's index is decoded at once while numpy is still loading
(lsbd.numpyload): the first read of a cold volume must not wait for numpy's
import; and an index numpy would not speed up never starts that import.
Run in a fresh interpreter, whose import of numpy the probe holds back
until it says so."""

import json
import subprocess
import sys

PROBE = r"""
import importlib.abc, json, sys, threading, time

release = threading.Event()
asked = threading.Event()

class HoldNumpy(importlib.abc.MetaPathFinder):
    # numpy's import waits here until released: a slow first import
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            asked.set()
            release.wait(20)
        return None

sys.meta_path.insert(0, HoldNumpy())

from lsbd import numpyload
from lsbd.checksum import crc32c, mask, masked_crc
from lsbd.format import segment
from lsbd.format.segment import DATA, Record, Trailer, encode_footer, index_of_footer

numpy_decodes = []      # indexes decoded with numpy
_arrays = segment.SegmentIndex.of_one_block_arrays.__func__
segment.SegmentIndex.of_one_block_arrays = classmethod(
    lambda cls, *a: numpy_decodes.append(1) or _arrays(cls, *a))

BS = 4096
ONE, MIXED = [], []
for i in range(64):     # one-block records, data offsets out of order at the end
    off = 64 + (i if i < 60 else 123 - i) * BS
    ONE.append(Record(DATA, 0, 1000 + 7 * i, 1, off, mask(crc32c(bytes([i]) * BS)).to_bytes(4, "little")))
MIXED = ONE[:10] + [Record(DATA, 0, 5, 3, 64 + 200 * BS,
                           b"".join(mask(crc32c(bytes([k]) * BS)).to_bytes(4, "little")
                                    for k in (1, 2, 3)))]


def decode(records):
    buf = encode_footer(records)
    trailer = Trailer(volume_id=bytes(16), seq=1, footer_offset=0, footer_length=len(buf),
                      record_count=len(records), sealed_ns=0, volume_size=0,
                      footer_crc=masked_crc(buf))
    idx = index_of_footer(buf, trailer, BS)
    crcs = {r.data_offset + k * BS: idx.crc_at(r.data_offset + k * BS)
            for r in records for k in range(r.nblocks)}
    return crcs

first = decode(MIXED)    # not every record one block: numpy is never asked for
mixed_asked = asked.wait(1)
t = time.monotonic()
before = [decode(ONE), decode(MIXED)]
took = time.monotonic() - t
held_back = asked.wait(10) and numpyload.loaded() is None
without = len(numpy_decodes)
release.set()
deadline = time.monotonic() + 30
while numpyload.loaded() is None and time.monotonic() < deadline:
    time.sleep(0.01)
after = [decode(ONE), decode(MIXED)]
want = {r.data_offset + k * BS: crc32c(bytes([i if r.nblocks == 1 else k + 1]) * BS)
        for i, r in enumerate(ONE) for k in range(r.nblocks)}
print(json.dumps({"took": took, "held_back": held_back,
                  "loaded": numpyload.loaded() is not None,
                  "same": before == after, "mixed_asked": mixed_asked,
                  "mixed_same": first == before[1],
                  "right": before[0] == want,
                  "numpy_before": without, "numpy_after": len(numpy_decodes) - without}))
"""


def test_an_index_is_decoded_while_numpy_loads_and_alike_once_loaded():
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["took"] < 5, got            # not held behind numpy's import (20 s)
    assert got["held_back"], got           # numpy's import was asked for, and still waiting
    assert got["loaded"], got              # ... and done once let through
    assert got["right"], got               # the record-by-record decode's CRCs
    assert got["same"], got                # the numpy path decodes the same index
    assert (got["numpy_before"], got["numpy_after"]) == (0, 1), got  # only ONE is all one-block
    assert not got["mixed_asked"], got      # an index it would not speed up never loads it
    assert got["mixed_same"], got
