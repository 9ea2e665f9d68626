"""This process's memory as Linux reports it (/proc/self/status), for the tests that measure loading and plans."""

from __future__ import annotations

from llama3_dist.checkpoint.base import trim_heap


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


class Growth:
    """This process's anonymous memory growth over a `with` block, from a trimmed heap: `now` (VmRSS) and
    `peak` (VmHWM), less the file pages mapped meanwhile (code pages touched the first time, file slices)."""

    def __enter__(self) -> Growth:
        trim_heap()
        self.base, self.base_file = status("VmRSS"), status("RssFile")
        reset_peak()
        return self

    def __exit__(self, *exc) -> None:
        files = status("RssFile") - self.base_file
        self.now = status("VmRSS") - self.base - files
        self.peak = status("VmHWM") - self.base - files
