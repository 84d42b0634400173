#!/usr/bin/env bash
# Run a command in a new network namespace with only loopback (127.0.0.0/8) up, and a
# default route over lo (some peers find no local address without one).
set -euo pipefail
if [ "${APPLIANCE_IN_NETNS:-}" = 1 ]; then exec "$@"; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
exec $SUDO unshare --net -- env APPLIANCE_IN_NETNS=1 bash -c '
  ip link set lo up
  ip route add default dev lo src 127.0.0.1
  exec "$@"' bash "$@"
