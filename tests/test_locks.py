"""The caches' inter-process locks are filelock's: exclusive while held, free once released."""

from __future__ import annotations

import pytest
from filelock import FileLock, Timeout

from ddsweep.features import CacheKey, FeatureCache
from ddsweep.fid import stats


def test_feature_cache_lock_is_exclusive(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    key = CacheKey("0123abcd", "ema", "digits:test:16:seed0:80-20", 16, 0, 0, "avg", "up4")
    path = tmp_path / "cache" / f".lock-{key.digest()}"
    with cache.lock(key), pytest.raises(Timeout):  # another holder must wait
        FileLock(path, timeout=0).acquire()
    with FileLock(path, timeout=0):  # released on leaving the block
        pass


def test_fid_stats_lock_is_exclusive(tmp_path):
    path = tmp_path / "fid" / ".lock-abc"  # the folder is made on first use
    with stats._lock(path), pytest.raises(Timeout):
        FileLock(path, timeout=0).acquire()
    with FileLock(path, timeout=0):
        pass
