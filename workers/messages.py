"""System messages shown to a party (`message` action), per language.

The ids and the Chinese texts are the original's (PROTOCOL.md, "System messages"); English
ships too. 520 is ours: it tells the parties that the paused video is back.
"""

from __future__ import annotations

TEXTS: dict[str, dict[int, str]] = {
    "zh-TW": {
        501: "系統偵測到您網路延遲,暫時關閉您的影像.",
        502: "系統偵測到對方的網路延遲,暫時關閉對方的影像.",
        503: "系統偵測到您的影像壅塞,暫時關閉您的影像.",
        504: "系統偵測到對方的影像壅塞,暫時關閉對方的影像.",
        505: "系統偵測到您的網路壅塞,暫時關閉對方的影像.",
        506: "系統偵測到對方的網路壅塞,暫時關閉對方的影像.",
        510: "系統沒有收到麥克風的聲音,請關閉瀏覽器,再試一次.",
        520: "網路已恢復,影像重新開啟.",
    },
    "en": {
        501: "We detected network delay on your side; your video is paused for now.",
        502: "We detected network delay on the other side; their video is paused for now.",
        503: "We detected your video is congested; your video is paused for now.",
        504: "We detected the other side's video is congested; their video is paused for now.",
        505: "We detected your network is congested; the other side's video is paused for now.",
        506: "We detected the other side's network is congested; their video is paused for now.",
        510: "No sound is reaching us from your microphone; please close the browser and "
             "try again.",
        520: "The network has recovered; video is back on.",
    },
}


def text(message_id: int, language: str) -> str:
    """'501 <text>' as the original sends it; unknown languages fall back to zh-TW."""
    table = TEXTS.get(language, TEXTS["zh-TW"])
    return f"{message_id} {table[message_id]}"
