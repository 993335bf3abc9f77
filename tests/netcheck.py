"""Network checks shared by the tests: free ports, and which addresses a set of processes listens on."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (ephemeral range: above Ray's worker ports 10002-19999)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def listening_sockets() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """socket inode -> (address, port) of every TCP socket in LISTEN state, from /proc/net/tcp{,6}."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
            out[fields[9]] = (ipaddress.ip_address(raw), int(hex_port, 16))
    return out


def listeners_of(procs: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of the listening sockets that these processes hold."""
    table = listening_sockets()
    found = []
    for pid in procs:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in table:
                addr, port = table[target[8:-1]]
                found.append((pid, str(addr), port))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc), e.g. the Ray daemons a driver started."""
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, set()).add(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found
