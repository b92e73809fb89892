"""coordinator.memory: the glibc malloc settings of the coordinator process."""

import platform

import pytest

from fedmla.coordinator.memory import ARENA_MAX, MMAP_THRESHOLD_BYTES, tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_applies_both_settings_unless_the_environment_gives_one(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert tune_malloc() == {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES, "MALLOC_ARENA_MAX": ARENA_MAX}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert tune_malloc() == {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES}
