"""When the background timer checkpoints: at the volume's count of new
segments or its interval, later while reads stream, never later than twice
either (lsbd.engine.checkpointer.Timer.checkpoint_due)."""

from __future__ import annotations

from types import SimpleNamespace

from lsbd.engine.checkpointer import READS_BUSY_BYTES, READS_PAUSE, READS_WINDOW, Timer
from lsbd.meta.config import VolumeConfig

MiB = 1 << 20


def _timer(last_checkpoint_time: float = 0.0) -> Timer:
    config = VolumeConfig(name="v", volume_id="0" * 32, size=1 << 30, checkpoint_segments=64,
                          checkpoint_interval=600.0)
    st = SimpleNamespace(config=config, last_checkpoint_time=last_checkpoint_time,
                         stats={"bytes_read": 0})
    return Timer(st, sealer=None, checkpointer=None)   # type: ignore[arg-type]


def _read(timer: Timer, now: float, nbytes: int) -> None:
    timer.st.stats["bytes_read"] += nbytes
    timer.note_reads(now)


def test_without_reads_a_checkpoint_is_due_at_its_count_or_interval():
    timer = _timer()
    timer.note_reads(10.0)
    assert not timer.checkpoint_due(0, 10.0)
    assert not timer.checkpoint_due(63, 10.0)
    assert timer.checkpoint_due(64, 10.0)
    assert not timer.checkpoint_due(0, 700.0)       # nothing new to checkpoint
    assert timer.checkpoint_due(1, 700.0)


def test_a_due_checkpoint_waits_while_reads_stream_and_runs_once_they_pause():
    timer = _timer()
    t = 10.0
    timer.note_reads(t)
    for _ in range(8):                 # 64 MiB/s in quarter-second ticks
        t += 0.25
        _read(timer, t, 16 * MiB)
        assert timer.reads_streaming(t)
        assert not timer.checkpoint_due(64, t)
        assert not timer.checkpoint_due(100, t)
        timer.st.last_checkpoint_time = t - 601.0     # past its interval
        assert not timer.checkpoint_due(1, t)
        timer.st.last_checkpoint_time = 0.0
    # A short pause (between two passes of a sequential reader) is no pause;
    # a trickle of reads is no stream.
    burst = t
    while timer.reads_streaming(t):
        assert not timer.checkpoint_due(64, t)
        t += 0.25
        _read(timer, t, 64 * 1024)
    assert burst + READS_PAUSE <= t <= burst + READS_WINDOW + READS_PAUSE + 0.25
    assert timer.checkpoint_due(64, t)
    # Streaming again, in bursts no longer than the window.
    _read(timer, t + READS_WINDOW / 2, READS_BUSY_BYTES)
    assert timer.reads_streaming(t + READS_WINDOW / 2)
    assert not timer.checkpoint_due(64, t + READS_WINDOW / 2)


def test_reads_put_a_checkpoint_off_by_no_more_than_twice_its_count_or_interval():
    timer = _timer()
    t = 10.0
    timer.note_reads(t)
    for _ in range(4):
        t += 0.25
        _read(timer, t, READS_BUSY_BYTES)
    assert timer.reads_streaming(t)
    assert not timer.checkpoint_due(127, t)
    assert timer.checkpoint_due(128, t)
    timer.st.last_checkpoint_time = t - 1199.0
    assert not timer.checkpoint_due(1, t)
    timer.st.last_checkpoint_time = t - 1200.0
    assert timer.checkpoint_due(1, t)
