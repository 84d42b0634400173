"""The machine under the bench: the loopback-only guard, cores and pinning, socket drops,
and the facts a report needs to be compared with another machine's."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
NETNS_SCRIPT = ROOT / "tests" / "in-loopback-netns.sh"


def loopback_only() -> bool:
    """True when every address of every interface is loopback (the namespace that
    tests/in-loopback-netns.sh makes): then no packet can leave 127.0.0.0/8."""
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if not (address.startswith("127.") or address == "::1"):
                return False
    return True


def ensure_loopback_namespace(argv: list[str]) -> None:
    """Re-run this command inside a fresh loopback-only namespace, or refuse.

    The bench sends hundreds of thousands of packets per second; they must never reach a
    real network. Outside the namespace we re-exec through the project's script (root, or
    sudo, is needed for `unshare --net`); inside it we check again rather than trust the
    environment variable the script sets.
    """
    if loopback_only():
        return
    if os.environ.get("APPLIANCE_IN_NETNS") == "1" or not NETNS_SCRIPT.exists():
        sys.exit("bench: refusing to run: this network namespace has non-loopback "
                 "addresses. Use tests/in-loopback-netns.sh .venv/bin/python -m bench ...")
    print("bench: not in a loopback-only network namespace; re-running inside one via "
          f"{NETNS_SCRIPT.relative_to(ROOT)}", file=sys.stderr, flush=True)
    os.execv(str(NETNS_SCRIPT),
             [str(NETNS_SCRIPT), sys.executable, "-m", "bench", *argv])


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def supervisor_worker_cores(workers: int, cores: list[int]) -> list[int]:
    """Where `supervisor.pool` will pin each worker: worker i on the i-th core it may use."""
    return [cores[i % len(cores)] for i in range(workers)]


def pin_process(pid: int, cores: Collection[int]) -> None:
    """Pin every thread of `pid` (sched_setaffinity on a pid moves one thread only)."""
    tasks = Path(f"/proc/{pid}/task")
    tids: Iterable[int] = (int(t.name) for t in tasks.iterdir()) if tasks.exists() else [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except (ProcessLookupError, PermissionError):
            continue


def cpu_split(pids: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes: system is mostly the kernel's UDP
    path, which on loopback also carries the delivery to the receiving socket."""
    user = system = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        user += times.user
        system += times.system
    return user, system


def cpu_seconds(pids: Iterable[int]) -> float:
    """user + system CPU seconds of these processes (threads included)."""
    total = 0.0
    for pid in pids:
        if pid <= 0:  # no such process (the Janus phase has no supervisor)
            continue
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def core_busy_seconds() -> list[float]:
    """Per core, seconds spent running something since boot (user, system, interrupts),
    for per-core utilisation over a window. Steal (a hypervisor giving the core to another
    guest) is not work done here and is counted apart."""
    out = []
    for times in psutil.cpu_times(percpu=True):
        idle = times.idle + getattr(times, "iowait", 0.0) + getattr(times, "steal", 0.0)
        out.append(sum(times) - idle)
    return out


def core_steal_seconds() -> list[float]:
    return [getattr(t, "steal", 0.0) for t in psutil.cpu_times(percpu=True)]


def core_total_seconds() -> list[float]:
    return [sum(t) for t in psutil.cpu_times(percpu=True)]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def udp_drops(groups: dict[str, Iterable[int]]) -> dict[str, int]:
    """Datagrams the kernel dropped on the UDP sockets of each group of processes (their
    receive buffers were full: the owner did not read in time). Tells the appliance's
    losses from the load generator's."""
    drops_by_inode: dict[int, int] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 13:
                drops_by_inode[int(fields[9])] = int(fields[12])
    out = {}
    for name, pids in groups.items():
        inodes: set[int] = set()
        for pid in pids:
            inodes |= _socket_inodes(pid)
        out[name] = sum(drops_by_inode.get(i, 0) for i in inodes)
    return out


def udp_receive_errors() -> int:
    """The namespace's UDP RcvbufErrors (every socket, whoever owns it)."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
    except OSError:
        return 0
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    if len(udp) < 2:
        return 0
    header, values = udp[0], udp[1]
    return int(values[header.index("RcvbufErrors")]) if "RcvbufErrors" in header else 0


def machine_facts() -> dict[str, Any]:
    import aioice
    import aiortc
    import av

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    freq = psutil.cpu_freq()
    return {
        "cpu_model": model or platform.processor(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_usable": usable_cores(),
        "cpu_mhz": round(freq.current) if freq else None,
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "aioice": getattr(aioice, "__version__", "?"),
        "av": av.__version__,
        "psutil": psutil.__version__,
        "loopback_only_namespace": loopback_only(),
    }
