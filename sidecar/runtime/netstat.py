"""Listen-queue overflows: requests the process never saw.

When the event loop cannot accept fast enough, the kernel's accept queue fills and
new connections are dropped before the process knows of them; no timestamp taken in
the process can show that wait. ``/proc/net/netstat`` (``TcpExt: ListenOverflows
ListenDrops``) counts it. The counters belong to the network namespace: in a pod,
every container of the pod (the gateway too), on a host, the whole host.
"""

from __future__ import annotations

from pathlib import Path

NETSTAT = Path("/proc/net/netstat")


def listen_queue(path: Path = NETSTAT) -> tuple[int, int] | None:
    """(ListenOverflows, ListenDrops) of this network namespace; None where unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return None
    rows = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    if len(rows) < 2:
        return None
    values = dict(zip(rows[0][1:], rows[1][1:], strict=False))
    try:
        return int(values["ListenOverflows"]), int(values["ListenDrops"])
    except (KeyError, ValueError):
        return None
