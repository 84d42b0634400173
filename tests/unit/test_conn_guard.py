"""Connection caps of the public port (sans-IO part of supervisor/front.py)."""

from supervisor.conn_guard import TOO_MANY_FROM_ADDRESS, TOO_MANY_TOTAL, ConnectionGuard


def test_per_address_and_total_caps() -> None:
    guard = ConnectionGuard(max_total=3, max_per_address=2)
    assert guard.admit("10.0.0.1") is None
    assert guard.admit("10.0.0.1") is None
    assert guard.admit("10.0.0.1") == TOO_MANY_FROM_ADDRESS
    assert guard.admit("10.0.0.2") is None
    assert guard.admit("10.0.0.3") == TOO_MANY_TOTAL
    assert (guard.open_total, guard.refused_total) == (3, 2)
    guard.closed("10.0.0.1")
    assert guard.admit("10.0.0.1") is None


def test_closing_frees_memory_and_never_goes_negative() -> None:
    guard = ConnectionGuard(max_total=0, max_per_address=0)  # 0: no limit
    for i in range(1000):
        assert guard.admit(f"10.0.{i // 250}.{i % 250}") is None
    for i in range(1000):
        guard.closed(f"10.0.{i // 250}.{i % 250}")
    guard.closed("10.9.9.9")  # never admitted
    assert (guard.open_total, guard.addresses) == (0, 0)
