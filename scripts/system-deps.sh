#!/bin/sh
# Installs the Debian packages the test suite needs when they are missing:
#   promtool (package prometheus)  - checks the /metrics exposition format
# Run as root (or with sudo available). Does nothing when everything is present.
set -eu
missing=""
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages:$missing"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
