"""platform.host_zeros: the buffers low-bit weights live in (huge pages where the kernel gives them)."""

from __future__ import annotations

import psutil
import pytest
import torch

from nanoserve import platform


@pytest.mark.parametrize("nbytes", [1000, (2 << 20) + 12345, 48 << 20])
def test_host_zeros_is_a_zeroed_buffer_of_the_size_asked(nbytes: int) -> None:
    buf = platform.host_zeros(nbytes)
    assert buf.dtype == torch.uint8 and buf.shape == (nbytes,) and buf.is_contiguous()
    assert int(buf.count_nonzero()) == 0
    buf[-1] = 7  # the whole length is writable
    assert int(buf[-1]) == 7


def test_large_buffers_start_on_a_huge_page_and_do_not_touch_their_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer starts 2 MiB-aligned, and only its own bytes become resident: the slack allocated to align it
    is never touched (with THP a touched slack page would be a whole 2 MiB)."""
    nbytes = 64 << 20
    before = psutil.Process().memory_info().rss
    buf = platform.host_zeros(nbytes)
    grown = psutil.Process().memory_info().rss - before
    if platform._huge_pages_enabled():
        assert buf.data_ptr() % platform.HUGE_PAGE_BYTES == 0
    assert grown <= nbytes + (1 << 20), f"resident memory grew {grown / 2**20:.1f} MiB for a {nbytes >> 20} MiB buffer"
    monkeypatch.setenv(platform.HUGE_PAGES_ENV, "0")
    plain = platform.host_zeros(nbytes)
    assert plain.shape == (nbytes,) and int(plain[:4096].count_nonzero()) == 0
