"""Long soak runs, excluded from `make test`; run them with `make test-slow`.

The same model and crash checks as the main suite, many times longer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from test_crash import _check_crash, _check_staged_crash
from test_model import (VolumeModel, VolumeModelLongJournal, VolumeModelRanges,
                        VolumeModelSealed, VolumeModelStaged, VolumeModelStoreMode)

pytestmark = pytest.mark.slow

_LONG = settings(max_examples=1000, stateful_step_count=80, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class SoakModel(VolumeModel):
    pass


class SoakModelRanges(VolumeModelRanges):
    pass


class SoakModelSealed(VolumeModelSealed):
    pass


class SoakModelLongJournal(VolumeModelLongJournal):
    pass


class SoakModelStoreMode(VolumeModelStoreMode):
    pass


class SoakModelStaged(VolumeModelStaged):
    pass


# Sealing costs each step more: fewer examples, still 10x the default tier's.
_SEALED = settings(_LONG, max_examples=250)

SoakModel.TestCase.settings = _LONG
SoakModelRanges.TestCase.settings = _LONG
SoakModelSealed.TestCase.settings = _SEALED
SoakModelLongJournal.TestCase.settings = _LONG
SoakModelStoreMode.TestCase.settings = _LONG
SoakModelStaged.TestCase.settings = _LONG
TestSoakModel = SoakModel.TestCase
TestSoakModelRanges = SoakModelRanges.TestCase
TestSoakModelSealed = SoakModelSealed.TestCase
TestSoakModelLongJournal = SoakModelLongJournal.TestCase
TestSoakModelStoreMode = SoakModelStoreMode.TestCase
TestSoakModelStaged = SoakModelStaged.TestCase


@pytest.mark.parametrize("seed", range(1000, 1200))
def test_sigkill_soak(tmp_path, seed):
    _check_crash(tmp_path, seed, lose_cache=seed % 4 == 0)


@pytest.mark.parametrize("seed", range(2000, 2100))
def test_sigkill_staged_soak(tmp_path, monkeypatch, seed):
    _check_staged_crash(tmp_path, monkeypatch, seed)
