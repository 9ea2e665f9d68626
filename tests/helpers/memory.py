"""This process's memory as Linux reports it (/proc/self/status), for the tests that measure loading and plans."""

from __future__ import annotations


def status(key: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS: now; VmHWM: peak RSS; RssAnon: heap and anonymous
    maps; RssFile: pages of mapped files, shared libraries included; RssShmem: shared memory)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    """VmHWM := VmRSS, so the next peak is measured from now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
