#!/usr/bin/env bash
# Install the Debian packages the test suite runs for real, when missing:
#   haproxy          the load balancer of the scaled-out deployment (tests/python/test_deploy.py
#                    runs the shipped deploy/haproxy/haproxy.cfg in front of three replicas);
#   chromium,        the browser the comparison page is tested in, headless, over WebDriver
#   chromium-driver  (tests/python/test_page.py).
# Needs root or passwordless sudo; skips what is already installed.
set -euo pipefail
missing=()
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
echo "installing ${missing[*]} from Debian's packages..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
  $sudo apt-get update -q >&2
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
