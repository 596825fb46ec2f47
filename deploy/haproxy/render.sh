#!/usr/bin/env bash
# Print deploy/haproxy/haproxy.cfg with fixed replica addresses in place of the DNS template,
# for replicas that are not containers (bare metal, VMs, the test suite):
#
#   deploy/haproxy/render.sh 10.0.0.5:8000 10.0.0.6:8000 > /etc/haproxy/haproxy.cfg
#
# The replicas are named inferd1, inferd2, ... in that order (the X-Inferd-Replica header, logs,
# metrics). Everything else in the file stays as shipped.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 HOST:PORT..." >&2; exit 2; }
cfg="$(dirname "$0")/haproxy.cfg"
grep -q '^    # --- servers' "$cfg" || { echo "$cfg has no servers block" >&2; exit 1; }
awk -v servers="$*" '
  /^    # --- servers/ { n = split(servers, s, " ");
                         for (i = 1; i <= n; i++) printf "    server inferd%d %s\n", i, s[i];
                         skip = 1; next }
  /^    # --- end servers/ { skip = 0; next }
  !skip { print }
' "$cfg"
