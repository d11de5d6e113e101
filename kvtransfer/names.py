"""Endpoint names, the identity a KV handshake is bound to.

A sender signs the endpoint it dialed; a receiver accepts a proof only for one of its own names (see
``control``). Both sides compare canonical forms: ``scheme://host:port`` with an IP host in its compressed
form (IPv6 in brackets, IPv4-mapped IPv6 as IPv4) and a DNS name lower-cased without its trailing dot.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

from pdserve.kvtransfer.base import TransferError

WILDCARDS = frozenset({"", "0.0.0.0", "::"})
_SIOCGIFADDR = 0x8915


def split_endpoint(endpoint: str, scheme: str) -> tuple[str, int]:
    """(host, port) of ``scheme://host:port``; a TransferError if it is not one."""
    prefix = f"{scheme}://"
    if not endpoint.startswith(prefix):
        raise TransferError(f"endpoint {endpoint!r} is not a {scheme} endpoint")
    host, _, port = endpoint[len(prefix) :].rpartition(":")
    try:
        port_num = int(port)
    except ValueError:
        raise TransferError(f"endpoint {endpoint!r} has no port") from None
    if not host or not 0 < port_num < 65536:
        raise TransferError(f"endpoint {endpoint!r} has no host or a bad port")
    return host.strip("[]"), port_num


def canonical_host(host: str) -> str:
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.lower().rstrip(".")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def canonical(endpoint: str) -> str:
    """The canonical form of ``scheme://host:port`` (a TransferError if it is not one)."""
    scheme = endpoint.partition("://")[0]
    host, port = split_endpoint(endpoint, scheme)
    return f"{scheme}://{canonical_host(host)}:{port}"


def name(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{canonical_host(host)}:{port}"


def is_loopback(endpoint: str) -> bool:
    """Whether a canonical endpoint names this machine's loopback (the same name means another machine
    to a peer on another host)."""
    host = endpoint.partition("://")[2].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in WILDCARDS


def local_addresses() -> set[str]:
    """This machine's interface addresses (the primary IPv4 address of each interface, every IPv6 one):
    the names a receiver bound to a wildcard address may be dialed by."""
    out: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, ifname in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out.add(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except (OSError, ValueError, IndexError):
        pass
    return out


class ReceiverNames:
    """The names one receiver answers to: its bound address (every local address for a wildcard bind),
    ``advertise_host``, and per connection the local address it arrived on (plus "localhost" for a
    loopback one)."""

    def __init__(self, scheme: str, advertise_host: str = ""):
        self.scheme = scheme
        self.advertise_host = advertise_host
        self.own: frozenset[str] = frozenset()
        self.port = 0

    def bind(self, host: str, port: int) -> str:
        """Record the names for a receiver bound to ``host:port``; returns the endpoint to advertise."""
        own = {name(self.scheme, host, port)} if not is_wildcard(host) else {
            name(self.scheme, a, port) for a in local_addresses()}
        if self.advertise_host:
            own.add(name(self.scheme, self.advertise_host, port))
        self.own, self.port = frozenset(own), port
        return name(self.scheme, self.advertise_host or host, port)

    def of(self, sock) -> frozenset[str]:
        """The names for one connection."""
        try:
            local = sock.getsockname()[0]
        except (OSError, IndexError, TypeError):
            local = ""
        if not local:
            return self.own
        here = name(self.scheme, local, self.port)
        return self.own | ({here, name(self.scheme, "localhost", self.port)} if is_loopback(here) else {here})
