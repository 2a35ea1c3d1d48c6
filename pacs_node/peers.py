"""Who may connect, and how many at once: the front door of both receivers.

A sender is known first by its address. Before a byte of its request is
read, a connection must come from an allowed network (``[node]
allowed_networks``, CIDR; empty: any) and find a free place: at most
``max_total`` connections at once, and at most ``max_per_peer`` from one
address, so that one broken or hostile host cannot take every place from
the others. Connections beyond that are closed at once; nothing is
allocated for them.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter


def parse_networks(networks: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDR texts (``10.1.0.0/16``, ``127.0.0.1``) as networks; ValueError names a bad one."""
    out = []
    for text in networks:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network (CIDR)") from None
    return out


class PeerGate:
    """Admits connections by network and by count (see the module)."""

    def __init__(self, networks: list[str] | None = None, max_total: int = 64,
                 max_per_peer: int = 16, what: str = "connections") -> None:
        self.networks = parse_networks(networks or [])
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.what = what                    # what its places are for, in its reasons
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allowed(self, address: str) -> bool:
        """Whether ``address`` lies in an allowed network (any, when none is configured)."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def enter(self, address: str) -> str | None:
        """Take a place for a connection from ``address``; None, or why there is none."""
        if not self.allowed(address):
            return "its address is not in an allowed network"
        with self._lock:
            if sum(self._open.values()) >= self.max_total:
                return f"{self.max_total} {self.what} are open already"
            if self._open[address] >= self.max_per_peer:
                return (f"{self.max_per_peer} {self.what} from that address are open "
                        f"already")
            self._open[address] += 1
        return None

    def leave(self, address: str) -> None:
        with self._lock:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]

    @property
    def open(self) -> int:
        with self._lock:
            return sum(self._open.values())
