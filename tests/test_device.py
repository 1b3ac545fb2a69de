"""efgraph.utils.device: the one /proc/self/status reader and the RSS read from it."""

from __future__ import annotations

import os
import sys

import pytest

from efgraph.utils.device import proc_self_status, process_rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_status_fields_rss_and_peak():
    assert proc_self_status("NoSuchField") is None
    mask = os.umask(0o027)
    try:
        assert int(proc_self_status("Umask"), 8) == 0o027  # what _atomic's permissions read
    finally:
        os.umask(mask)
    block = bytearray(64 * 2**20)  # touched: resident
    now, peak = process_rss_mb(), process_rss_mb(peak=True)
    # the kernel syncs its per-thread RSS counters lazily: a few MiB of slack
    assert 64 < now <= peak + 8
    assert abs(now - int(proc_self_status("VmRSS").split()[0]) / 1024) < 16
    del block
