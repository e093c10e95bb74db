#!/usr/bin/env bash
# Run a command inside a private network namespace: only 'lo' (127.0.0.1 and 127.0.0.2,
# which aiortc needs for host candidates), so nothing it does can leave the machine.
# As root a plain namespace; otherwise a user namespace where the kernel allows one.
# Usage: scripts/isolated.sh CMD [ARGS...]
set -euo pipefail
if [ -n "${SONIC_VOICE_NETNS:-}" ]; then exec "$@"; fi
if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
if ! "${ns[@]}" true 2>/dev/null; then
  echo "isolated: cannot create a network namespace here; ROS discovery stays on localhost" \
       "(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) but WebRTC tests may see other interfaces" >&2
  export SONIC_VOICE_NETNS=0 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
  exec "$@"
fi
exec "${ns[@]}" env SONIC_VOICE_NETNS=1 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST bash -c '
  ip link set lo up
  ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true
  exec "$@"' isolated "$@"
