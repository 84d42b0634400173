"""The room's network watch (workers/room_watch.py): what it makes of each party's
figures between ticks."""

from __future__ import annotations

from appliance.core.config import ConditionsConfig, MessagesConfig
from appliance.media import rtcp
from appliance.media.quality import StreamMeter
from appliance.media.video import VideoPath
from workers.room_watch import RoomWatch, watch_thresholds


def path() -> VideoPath:
    return VideoPath(StreamMeter(90000, is_vp8=True), lambda packet: None, feedback_ssrc=1)


def watch() -> RoomWatch:
    return RoomWatch(7, watch_thresholds(ConditionsConfig()), MessagesConfig())


def test_the_receivers_feedback_counts_while_video_is_sent_to_it() -> None:
    w, incoming, outgoing = watch(), path(), path()
    outgoing._forwarded = 100
    outgoing.nacked = 10
    outgoing.from_sink_feedback(rtcp.Remb(40_000, (5,)))
    sample = w._sample("user", incoming, outgoing)
    assert sample.downlink_loss_pct == 10.0
    assert sample.remb_kbps == 40.0


def test_feedback_from_before_a_pause_is_not_evidence_while_nothing_is_sent() -> None:
    w, incoming, outgoing = watch(), path(), path()
    outgoing._forwarded = 100
    outgoing.from_sink_feedback(rtcp.Remb(40_000, (5,)))  # far under remb_min_kbps
    assert w._sample("user", incoming, outgoing).remb_kbps == 40.0
    # The path is paused: nothing forwarded since the last tick. The stale REMB and
    # report must let "network congested" clear, or the pause it caused would never end.
    sample = w._sample("user", incoming, outgoing)
    assert sample.remb_kbps is None and sample.downlink_loss_pct == 0.0
