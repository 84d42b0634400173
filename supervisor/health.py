"""Per-core and per-worker health: what the supervisor knows, as Prometheus text and JSON.

Workers report their own figures every second (`bus.WorkerStats`); the supervisor adds what
only it can see (CPU and memory from psutil, restarts, free channels, degraded marks).

A worker whose event loop lags is *degraded* and gets no new calls. `HealthBook.record`
judges that and returns the change; the supervisor marks it in placement and logs it. The
views read each figure from its owner, given at construction: placement (ready, degraded,
channels), the pool (pid, core, restarts), liveness (silent), the call registry, peers,
and the supervisor's own counters as callables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from appliance.edges import bus

if TYPE_CHECKING:
    from supervisor.calls import CallRegistry
    from supervisor.liveness import Liveness
    from supervisor.peers import Peers
    from supervisor.placement import Placement
    from supervisor.pool import WorkerPool


@dataclass(frozen=True)
class LagLimits:
    """admin.degraded_lag_ms and admin.degraded_after."""

    lag_ms: float  # loop lag p99 above this is lagging
    after: float  # seconds of lagging that make a worker degraded


@dataclass
class WorkerHealth:
    index: int
    stats: bus.WorkerStats | None = None
    process: psutil.Process | None = None
    cpu_cores: float = 0.0  # core-seconds per second over the last sample
    rss_bytes: int = 0
    lagging_since: float | None = None
    _cpu_last: tuple[float, float] | None = field(default=None, repr=False)

    def sample_process(self, pid: int | None, now: float) -> None:
        if pid is None:
            return
        if self.process is None or self.process.pid != pid:
            try:
                self.process = psutil.Process(pid)
            except psutil.Error:
                self.process = None
                return
            self._cpu_last = None
        try:
            times = self.process.cpu_times()
            self.rss_bytes = self.process.memory_info().rss
        except psutil.Error:
            return
        used = times.user + times.system
        if self._cpu_last is not None:
            previous_used, previous_at = self._cpu_last
            if now > previous_at:
                self.cpu_cores = max(0.0, (used - previous_used) / (now - previous_at))
        self._cpu_last = (used, now)


# Counters of hostile input a worker refused (bus.WorkerStats), with their /metrics help.
_REFUSAL_KEYS = {
    "sip_refused_source": "SIP datagrams refused: source not the dialog's peer or allowed.",
    "sip_parse_errors": "SIP datagrams that did not parse.",
    "sip_replies_limited": "SIP answers to refused or bad datagrams held back by the limit.",
    "rtp_refused_source": "Phone-side RTP/RTCP not from the address the SDP negotiated.",
    "media_oversized": "Media datagrams dropped as empty or larger than 1500 bytes.",
    "media_unprotect_failed": "SRTP/SRTCP packets that failed authentication or replay check.",
    "media_malformed": "Media packets a handler could not use (dropped, counted).",
}
# The worker's one WebRTC media port (media.udp_port / tcp_port), since it opened.
_MEDIA_PORT_KEYS = {
    "ice_checks": "ICE connectivity checks answered on the worker's media port.",
    "ice_consent_failures": "Calls released because their browser stopped ICE consent "
                            "checks (RFC 7675: its network went away).",
    "ice_tcp_connections": "ICE-TCP connections accepted on the worker's TCP media port.",
    "ice_tcp_drops": "Media frames dropped whole towards ICE-TCP readers too slow for "
                     "media.tcp_send_buffer.",
    "ice_tcp_refused": "ICE-TCP connections refused: over media.tcp_max_connections, or "
                       "media.tcp_max_per_address from one address.",
}


class HealthBook:
    """Each worker's last report and process figures, the lag verdicts, and the views."""

    def __init__(self, appliance_id: str, limits: LagLimits, placement: Placement,
                 pool: WorkerPool, liveness: Liveness, calls: CallRegistry, peers: Peers,
                 periodic_failures: Callable[[], dict[str, int]],
                 admission_status: Callable[[], dict[str, Any]]) -> None:
        self.appliance_id = appliance_id
        self.limits = limits
        self.placement = placement
        self.pool = pool
        self.liveness = liveness
        self.calls = calls
        self.peers = peers
        self.periodic_failures = periodic_failures
        self.admission_status = admission_status
        self.workers = {i: WorkerHealth(i) for i in range(len(placement.slots))}
        self.per_core: list[float] = []
        self.sampled_at = 0.0
        psutil.cpu_percent(percpu=True)  # prime: the first call has no interval

    def record(self, stats: bus.WorkerStats) -> bool | None:
        """Keep a worker's report. True when it makes the worker degraded, False when the
        worker has recovered, None when nothing changes: the supervisor applies it."""
        health = self.workers[stats.index]
        health.stats = stats
        return self._judge(health, stats, time.monotonic())

    def _judge(self, health: WorkerHealth, stats: bus.WorkerStats, now: float) -> bool | None:
        """Degraded while the loop lag p99 stays high: such a worker gets no new calls."""
        degraded = self.placement.slots[health.index].degraded
        if stats.loop_lag_p99_ms > self.limits.lag_ms:
            if health.lagging_since is None:
                health.lagging_since = now
            if not degraded and now - health.lagging_since >= self.limits.after:
                return True
        else:
            health.lagging_since = None
            if degraded:
                return False
        return None

    def sample(self) -> None:
        """Called every second by a `Periodic`: an error here (psutil's EMFILE) is logged
        there and the next second samples again."""
        now = time.monotonic()
        self.per_core = psutil.cpu_percent(percpu=True)
        for index, health in self.workers.items():
            health.sample_process(self.pool.pid(index), now)
        self.sampled_at = round(now, 3)

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        workers = []
        for index, health in self.workers.items():
            slot = self.placement.slots[index]
            process = self.pool.workers[index]
            stats = health.stats
            workers.append({
                "index": index,
                "pid": self.pool.pid(index),
                "core": process.core,
                "ready": slot.ready,
                "degraded": slot.degraded,
                # Not heard on the bus for admin.heartbeat_timeout: no new calls there.
                "silent": self.liveness.is_silent(index),
                "quiet_s": round(self.liveness.quiet_for(index), 2),
                "restarts": process.restarts,
                "channels_total": len(slot.channels),
                "channels_busy": len(slot.channels) - len(slot.free),
                "cpu_cores": round(health.cpu_cores, 4),
                "rss_bytes": health.rss_bytes,
                "loop_lag_p50_ms": stats.loop_lag_p50_ms if stats else 0.0,
                "loop_lag_p99_ms": stats.loop_lag_p99_ms if stats else 0.0,
                "calls_placed": stats.calls_placed if stats else 0,
                "calls_failed": stats.calls_failed if stats else 0,
                "packets_received": stats.packets_received if stats else 0,
                "packets_sent": stats.packets_sent if stats else 0,
                "decoders_created": stats.decoders_created if stats else 0,
                # What the worker refused from the network (issue 10), since it started.
                **{key: getattr(stats, key) if stats else 0 for key in _REFUSAL_KEYS},
                **{key: getattr(stats, key) if stats else 0 for key in _MEDIA_PORT_KEYS},
                "native_loop": stats.native_loop if stats else 0,
            })
        calls = [
            {"channel": r.channel, "worker": r.worker, "dialogid": r.dialogid, "ref": r.ref,
             "module": r.module, "age_s": round(time.monotonic() - r.started, 1)}
            for r in sorted(self.calls.records(), key=lambda r: r.channel)
        ]
        peers = self.peers.stats
        return {"appliance": self.appliance_id, "cores_percent": self.per_core,
                "workers": workers, "calls": calls,
                "sampled_at": self.sampled_at,  # monotonic s of the last health sample
                "periodic_failures": self.periodic_failures(),
                # Duplicate-login notices between appliances (supervisor/peers.py).
                "peers_listening": self.peers.listening,
                "peers_notices_sent": peers.sent,
                "peers_notice_failures": peers.failures,
                "peers_notices_received": peers.received,
                "peers_keys_refused": peers.keys_refused,
                # Offers refused by admission control, wrong roomkeys (supervisor/admission.py).
                "admission": self.admission_status()}

    def prometheus(self) -> str:
        status = self.status()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str,
                   values: list[tuple[dict[str, Any], float]]) -> None:
            lines.append(f"# HELP appliance_{name} {help_text}")
            lines.append(f"# TYPE appliance_{name} {kind}")
            for labels, value in values:
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"appliance_{name}{{{text}}} {value}")

        metric("core_cpu_percent", "gauge", "CPU use of each core of the box.",
               [({"core": str(i)}, v) for i, v in enumerate(status["cores_percent"])])
        per_worker = [
            ("worker_up", "gauge", "1 when the worker is running and ready.",
             "ready"),
            ("worker_degraded", "gauge", "1 while the worker gets no new calls (loop lag).",
             "degraded"),
            ("worker_silent", "gauge", "1 while the worker is not heard on the bus (no new "
             "calls; restarted after admin.hung_restart_after).", "silent"),
            ("worker_restarts_total", "counter", "Times the worker was restarted.",
             "restarts"),
            ("worker_channels", "gauge", "Channels this worker owns.",
             "channels_total"),
            ("worker_channels_busy", "gauge", "Channels in use (live calls and legs).",
             "channels_busy"),
            ("worker_cpu_cores", "gauge", "Core-seconds per second the worker used.",
             "cpu_cores"),
            ("worker_memory_bytes", "gauge", "Resident memory of the worker.",
             "rss_bytes"),
            ("worker_loop_lag_p50_ms", "gauge", "Event-loop lag, median (ms).",
             "loop_lag_p50_ms"),
            ("worker_loop_lag_p99_ms", "gauge", "Event-loop lag, 99th percentile (ms).",
             "loop_lag_p99_ms"),
            ("worker_calls_placed_total", "counter", "Legs placed on the worker.",
             "calls_placed"),
            ("worker_calls_failed_total", "counter", "Legs that ended other than normally.",
             "calls_failed"),
            ("worker_packets_received_total", "counter", "RTP packets relayed in.",
             "packets_received"),
            ("worker_packets_sent_total", "counter", "RTP packets relayed out to browsers.",
             "packets_sent"),
            ("worker_decoders_created_total", "counter",
             "Media decoders created (the relay never decodes: should stay 0).",
             "decoders_created"),
            ("worker_native_loop", "gauge", "1 while the native packet loop drains the "
             "worker's UDP media port; 0: the pure-Python path (not built, or "
             "media.native_loop = false).", "native_loop"),
            *((f"worker_{key}_total", "counter", help_text, key)
              for key, help_text in _REFUSAL_KEYS.items()),
            *((f"worker_{key}_total", "counter", help_text, key)
              for key, help_text in _MEDIA_PORT_KEYS.items()),
        ]
        for name, kind, help_text, key in per_worker:
            metric(name, kind, help_text,
                   [({"worker": str(w["index"]), "core": str(w["core"])}, int(w[key])
                     if isinstance(w[key], bool) else w[key]) for w in status["workers"]])
        metric("calls", "gauge", "Live calls and legs on the appliance.",
               [({}, len(status["calls"]))])
        metric("periodic_failures_total", "counter", "Errors of the supervisor's periodic "
               "jobs (each logged at most once a minute; the job keeps running).",
               [({"job": name}, n) for name, n in status["periodic_failures"].items()])
        for name, help_text in (
            ("notices_sent", "Duplicate-login notices a peer appliance acknowledged."),
            ("notice_failures", "Duplicate-login notices that did not reach their peer "
                                "(unknown, unreachable, timed out or refused)."),
            ("notices_received", "Duplicate-login notices received from peer appliances."),
            ("keys_refused", "Notice connections refused: CURVE key not in [peers]."),
        ):
            metric(f"peers_{name}_total", "counter", help_text,
                   [({}, status[f"peers_{name}"])])
        adm = status["admission"]
        metric("calls_in_setup", "gauge", "Calls booked whose DTLS is not up yet.",
               [({}, adm["calls_in_setup"])])
        metric("offers_refused_total", "counter", "Offers refused before placement, by "
               "causestring (admission limits, roomkeys, tokens, no circuit).",
               [({"reason": r}, n) for r, n in sorted(adm["offers_refused"].items())])
        for name, help_text in (
            ("wrong_roomkeys", "Agent offers whose roomkey is not a live room."),
            ("agent_tokens_refused", "Agent offers whose token was missing or invalid."),
            ("roomkey_blocks", "Times a connection or address was put in the roomkey "
                               "cool-down."),
            ("frame_errors", "Browser frames that hit an internal error (logged)."),
        ):
            metric(f"{name}_total", "counter", help_text, [({}, adm[name])])
        return "\n".join(lines) + "\n"
