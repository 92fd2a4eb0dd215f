"""`lsbd compact`'s reasons agree in number: '1 segment ... is',
'3 segments ... are'."""

from lsbd.cli.cmd_compact import why

REPORT = {"held_by_window_segments": 0, "held_by_window_bytes": 0, "retain_seconds": 86400,
          "held_by_points_segments": 0, "held_by_points_bytes": 0,
          "held_by_threshold_segments": 0, "held_by_threshold_bytes": 0, "threshold": 0.5,
          "bytes_reclaimed": 0}


def test_one_segment_is_three_segments_are():
    for held in ("window", "points", "threshold"):
        one = why({**REPORT, f"held_by_{held}_segments": 1, f"held_by_{held}_bytes": 4 << 20})
        assert one[0].startswith("1 segment with 4.0 MiB of old data is "), one
        three = why({**REPORT, f"held_by_{held}_segments": 3, f"held_by_{held}_bytes": 4 << 20})
        assert three[0].startswith("3 segments with 4.0 MiB of old data are "), three
        assert " they " not in one[0] and " them)" not in one[0], one
    window = {**REPORT, "held_by_window_segments": 1, "held_by_window_bytes": 1}
    assert "): it becomes reclaimable once" in why(window)[0]
    window["held_by_window_segments"] = 2
    assert "): they become reclaimable once" in why(window)[0]
