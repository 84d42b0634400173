"""Where a process meets another: the supervisor-worker bus, the AP-S HTTP client, and
aiortc (every use of its private hooks)."""
