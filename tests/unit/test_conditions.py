from appliance.media.conditions import (
    Change,
    Condition,
    MicrophoneWatch,
    PartyWatch,
    Sample,
    Thresholds,
    opus_has_sound,
    pcmu_has_sound,
)
from workers import messages

T = Thresholds(hold_s=3.0, clear_s=5.0, silent_mic_s=10.0)
LOSSY = Sample(video_loss_pct=30.0, receiving_video=True)
CLEAN = Sample(receiving_video=True)


def run(watch: PartyWatch, sample: Sample, start: float, seconds: int) -> list[Change]:
    changes = []
    for t in range(seconds):
        changes += watch.feed(sample, start + t)
    return changes


def test_a_condition_starts_only_after_holding_and_ends_only_after_clearing() -> None:
    watch = PartyWatch(T)
    assert run(watch, LOSSY, 0, 3) == []  # t=0,1,2: not held for 3 s yet
    assert watch.feed(LOSSY, 3) == [Change(Condition.VIDEO_CONGESTED, True)]
    assert watch.active() == {Condition.VIDEO_CONGESTED}
    assert run(watch, CLEAN, 4, 5) == []  # t=4..8: clear for 4 s
    assert watch.feed(CLEAN, 9) == [Change(Condition.VIDEO_CONGESTED, False)]


def test_a_brief_spike_does_nothing() -> None:
    watch = PartyWatch(T)
    changes = run(watch, LOSSY, 0, 2) + run(watch, CLEAN, 2, 10) + run(watch, LOSSY, 12, 2)
    assert changes == []


def test_each_condition_from_its_own_measure() -> None:
    delay = PartyWatch(T)
    assert Change(Condition.DELAY, True) in run(
        delay, Sample(video_jitter_ms=150, receiving_video=True), 0, 4)
    downlink = PartyWatch(T)
    assert Change(Condition.NETWORK_CONGESTED, True) in run(
        downlink, Sample(downlink_loss_pct=25), 0, 4)
    starved = PartyWatch(T)
    assert Change(Condition.NETWORK_CONGESTED, True) in run(starved, Sample(remb_kbps=20), 0, 4)
    no_video = PartyWatch(T)  # jitter and loss mean nothing when no video comes at all
    assert run(no_video, Sample(video_jitter_ms=500, video_loss_pct=90), 0, 10) == []


def test_microphone_silence_warns_once() -> None:
    mic = MicrophoneWatch(T, connected_at=100.0)
    assert not mic.check(105)
    mic.heard(106)
    assert not mic.check(115)
    assert mic.check(116.5)
    assert not mic.check(130)


def test_silence_detection() -> None:
    assert not pcmu_has_sound(b"\xff" * 160) and not pcmu_has_sound(b"\x7f\xff" * 80)
    assert pcmu_has_sound(bytes(range(160)))
    assert not opus_has_sound(b"\x08\x00\x01") and opus_has_sound(b"\x78" * 60)


def test_message_texts_fit_the_protocol() -> None:
    for language, table in messages.TEXTS.items():
        for message_id in table:
            text = messages.text(message_id, language)
            assert text.startswith(f"{message_id} ")
            assert len(text.encode()) <= 128, (language, message_id)
    assert messages.text(501, "zh-TW") == "501 系統偵測到您網路延遲,暫時關閉您的影像."
