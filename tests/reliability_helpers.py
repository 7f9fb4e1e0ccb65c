"""Helpers shared by the live reliability tests: metric samples and deltas, a server's resident memory."""

from __future__ import annotations

import httpx


def samples(url: str) -> dict[str, float]:
    """Every sample of /metrics: ``name{labels}`` -> value."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def moved(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float]:
    """Label sets of ``name`` whose value changed: {'{labels}': delta}."""
    out = {}
    for series in set(before) | set(after):
        if series.startswith(name + "{"):
            delta = after.get(series, 0.0) - before.get(series, 0.0)
            if delta:
                out[series[len(name) :]] = delta
    return out


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS from /proc), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
