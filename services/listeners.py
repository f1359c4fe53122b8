"""Which TCP ports the processes of a state directory listen on, and on which addresses (from ``/proc``).

FLEAD binds every server to 127.0.0.1; `exposed` lists any listening socket of our processes (each started
process and everything in its session: a job's JVM, its Python workers) that is reachable from elsewhere.
Linux only; stdlib only.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from services import processes

LISTEN_STATE = "0A"


@dataclass(frozen=True)
class Listener:
    """One listening socket: the process that holds it and the address it is bound to."""

    service: str
    pid: int
    command: str
    address: str
    port: int

    @property
    def loopback_only(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.service} (pid {self.pid}, {self.command}) listens on {host}:{self.port}"


def _decode_address(hex_address: str) -> tuple[str, int]:
    """An address of /proc/net/tcp{,6} (``0100007F:1F90``) as ('127.0.0.1', 8080)."""
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    # the kernel prints each 32-bit word in host byte order (little-endian here)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port_hex, 16)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Every listening TCP socket of this network namespace: inode → (address, port)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN_STATE:
                address = _decode_address(fields[1])
                mapped = ipaddress.ip_address(address[0])
                if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
                    address = (str(mapped.ipv4_mapped), address[1])
                found[int(fields[9])] = address
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (empty if it is gone or not ours to read)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def state_dir_processes(state_dir: Path) -> dict[int, str]:
    """Every live process started under `state_dir` (pid files in ``run/``) and the rest of its session:
    pid → the service name."""
    owned = {}
    run = processes.run_dir(state_dir)
    for pid_path in sorted(run.glob("*.pid")) if run.exists() else []:
        recorded = processes.recorded_pid(state_dir, pid_path.stem)
        if recorded is None:
            continue
        for pid in processes.session_members(*recorded):
            owned.setdefault(pid, pid_path.stem)
    return owned


def processes_mentioning(text: str, name: str) -> dict[int, str]:
    """Live processes whose command line contains `text` (e.g. a state dir that daemons were started with), and
    all their descendants: pid → `name`."""
    parents: dict[int, int] = {}
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return {pid: name for pid in found}


def listeners(pids: dict[int, str]) -> list[Listener]:
    """The listening sockets held by `pids` (pid → service name)."""
    sockets = listening_sockets()
    out = []
    for pid, service in sorted(pids.items()):
        for inode in socket_inodes(pid):
            if inode in sockets:
                address, port = sockets[inode]
                out.append(Listener(service, pid, _command(pid), address, port))
    return sorted(set(out), key=lambda item: (item.service, item.port, item.pid))


def exposed(state_dir: Path) -> list[Listener]:
    """Listening sockets of the state directory's processes that are not bound to a loopback address."""
    return [item for item in listeners(state_dir_processes(state_dir)) if not item.loopback_only]
