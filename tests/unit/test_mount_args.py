"""`lsbd mount --readahead`: whole pages, within bounds, and a value that
would round down to no read-ahead is refused rather than taken as 0."""

import pytest

from lsbd.cli.cmd_mount import READAHEAD_MAX, readahead_arg
from lsbd.errors import UserError


@pytest.mark.parametrize("text, expect", [("0", 0), ("4k", 4096), ("1M", 1 << 20),
                                          ("6000", 4096), ("256M", READAHEAD_MAX)])
def test_readahead_is_taken_in_whole_pages(text, expect):
    assert readahead_arg(text) == expect


@pytest.mark.parametrize("text", ["1k", "100", "257M"])
def test_a_readahead_out_of_bounds_is_one_clear_error(text):
    with pytest.raises(UserError, match="bad readahead"):
        readahead_arg(text)
