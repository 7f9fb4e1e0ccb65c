"""Helpers shared by the live reliability tests: metric samples and deltas, a server's resident memory."""

from __future__ import annotations

import socket

import httpx


def samples(url: str) -> dict[str, float]:
    """Every sample of /metrics: ``name{labels}`` -> value; each declared family also as ``# TYPE name``
    (value 0), so that :func:`moved` can tell a family with no movement from one that is not there."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("# TYPE "):
            out[f"# TYPE {line.split()[2]}"] = 0.0
        elif line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def moved(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float]:
    """Label sets of ``name`` whose value changed: {'{labels}': delta}. Fails when /metrics does not declare
    ``name`` at all (a renamed metric must not read as "nothing moved")."""
    assert f"# TYPE {name}" in after, f"/metrics declares no {name}"
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


def send_chunks_until_answered(
    sock: socket.socket, max_bytes: int, chunk_size: int = 16 * 1024
) -> tuple[int, bytes]:
    """Stream a chunked body on ``sock`` (headers already sent) until the server answers or ``max_bytes``
    went out; returns (bytes sent, first bytes of the answer). A server cutting the upload short shows as
    an early answer or a reset connection, never as the whole body read."""
    chunk = b"%x\r\n%s\r\n" % (chunk_size, b"z" * chunk_size)
    sent, first = 0, b""
    try:
        for _ in range(max_bytes // chunk_size):
            sock.sendall(chunk)
            sent += chunk_size
            sock.settimeout(0.01)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                continue
            if first:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(30)
    return sent, first
