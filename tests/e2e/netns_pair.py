"""A second "host" for tests: a child network namespace joined to ours by a veth pair.

Both veth ends get 127.x addresses, so nothing the tests send ever carries an address
outside 127.0.0.0/8:

- `route_localnet=1` lets the kernel route 127/8 over a non-loopback device at all;
- every namespace's local table says `local 127.0.0.0/8 dev lo` (all of 127/8 is "this
  host"), so a more specific `127.100.0.0/30 dev veth` route goes into the local table
  too, or the peer's address would be answered by our own lo;
- IPv6 is off on the veth ends (no link-local addresses, router or neighbour
  solicitations), and the neighbours are static (no ARP).

Run only inside the throw-away loopback namespace of tests/in-loopback-netns.sh: the
sysctls and routes set here die with it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PREFIX = 30
PARENT_IP = "127.100.0.1"  # our end of the veth
CHILD_IP = "127.100.0.2"  # the child namespace's end
SUBNET = "127.100.0.0/30"


def _netns_inode(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def inside_test_namespace() -> bool:
    """True inside tests/in-loopback-netns.sh's namespace, before any veth exists: only
    loopback addresses, and (where PID 1's namespace is readable) not the machine's own."""
    from bench.system import loopback_only

    try:
        if _netns_inode("self") == _netns_inode(1):
            return False
    except OSError:
        pass  # PID 1 belongs to someone else here: the other two checks still hold
    return os.environ.get("APPLIANCE_IN_NETNS") == "1" and loopback_only()


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


class ChildHost:
    """`unshare --net` holds the child namespace open; commands enter it with nsenter."""

    def __init__(self) -> None:
        if not inside_test_namespace():
            raise RuntimeError("refusing to add interfaces outside the test's own namespace")
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        self.ours = f"dlp{self.holder.pid % 100000}"
        self.theirs = f"dlc{self.holder.pid % 100000}"
        deadline = time.monotonic() + 5
        while _netns_inode(self.holder.pid) == _netns_inode("self"):
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("unshare --net did not create a namespace")
            time.sleep(0.01)
        try:
            self._wire()
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        """Put in front of a command to run it in the child namespace."""
        return ["nsenter", "--target", str(self.holder.pid), "--net", "--"]

    def run(self, *cmd: str) -> str:
        return _run(*self.prefix, *cmd)

    def _wire(self) -> None:
        here, there = _run, self.run
        there("ip", "link", "set", "lo", "up")
        # As tests/in-loopback-netns.sh does: some peers find no local address without it.
        there("ip", "route", "add", "default", "dev", "lo", "src", "127.0.0.1")
        here("ip", "link", "add", self.ours, "type", "veth", "peer", "name", self.theirs,
             "netns", str(self.holder.pid))
        for side, dev, address in ((here, self.ours, PARENT_IP), (there, self.theirs, CHILD_IP)):
            if Path("/proc/sys/net/ipv6").exists():
                side("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
            side("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1",
                 f"net.ipv4.conf.{dev}.route_localnet=1")
            side("ip", "addr", "add", f"{address}/{PREFIX}", "dev", dev)
            side("ip", "link", "set", dev, "up")
            side("ip", "route", "add", SUBNET, "dev", dev, "table", "local")
        our_mac, their_mac = self._mac(here, self.ours), self._mac(there, self.theirs)
        here("ip", "neigh", "replace", CHILD_IP, "lladdr", their_mac, "dev", self.ours,
             "nud", "permanent")
        there("ip", "neigh", "replace", PARENT_IP, "lladdr", our_mac, "dev", self.theirs,
              "nud", "permanent")

    @staticmethod
    def _mac(side: Callable[..., str], dev: str) -> str:
        return json.loads(side("ip", "-j", "link", "show", "dev", dev))[0]["address"]

    def veth_packets(self) -> tuple[int, int]:
        """(received, sent) packets on our veth end."""
        stats = json.loads(_run("ip", "-j", "-s", "link", "show", "dev", self.ours))[0]
        return stats["stats64"]["rx"]["packets"], stats["stats64"]["tx"]["packets"]

    def probe(self, timeout: float = 5) -> None:
        """TCP and UDP from the child to us over the veth, before any appliance starts."""
        with socket.socket() as listener, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            listener.bind((PARENT_IP, 0))
            listener.listen()
            listener.settimeout(timeout)
            udp.bind((PARENT_IP, 0))
            udp.settimeout(timeout)
            tcp_port, udp_port = listener.getsockname()[1], udp.getsockname()[1]
            script = (
                "import socket\n"
                f"c = socket.create_connection(({PARENT_IP!r}, {tcp_port}), timeout={timeout})\n"
                "c.sendall(b'tcp-probe'); c.recv(16)\n"
                "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"u.sendto(b'udp-probe', ({PARENT_IP!r}, {udp_port}))\n"
            )
            child = subprocess.Popen([*self.prefix, sys.executable, "-c", script])
            try:
                conn, (source, _) = listener.accept()
                with conn:
                    assert conn.recv(16) == b"tcp-probe" and source == CHILD_IP, source
                    conn.sendall(b"ok")  # the way back, child-bound
                data, (source, _) = udp.recvfrom(64)
                assert data == b"udp-probe" and source == CHILD_IP, source
            finally:
                assert child.wait(timeout) == 0, "the probe in the child namespace failed"

    def close(self) -> None:
        """Processes started in the child namespace are the caller's to stop first."""
        # Deleting one end deletes the pair; the kernel would also do it once the child
        # namespace is gone, but only later, from a work queue.
        subprocess.run(["ip", "link", "del", self.ours], capture_output=True, timeout=10)
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
