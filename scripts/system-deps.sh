#!/bin/sh
# Installs the Debian packages a make target needs, when they are missing:
#   sh scripts/system-deps.sh            make test (and make packaging-check):
#       promtool (prometheus)            checks the /metrics exposition format
#       systemd-analyze (systemd)        verifies and rates the packaged unit
#       redis-server                     the shared state store's tests (each test starts
#                                        its own server on a free port)
#   sh scripts/system-deps.sh deb        make deb: build the .deb and run lintian
#   sh scripts/system-deps.sh deb-test   make deb-test: the above, plus debootstrap and
#                                        systemd-nspawn
# Run as root (or with sudo available). Does nothing when everything is present.
set -eu
group="${1:-test}"
missing=""
need() {  # need COMMAND-OR-PATH PACKAGE, or need - PACKAGE (installed at all)
    case "$1" in
        -) dpkg-query -W -f='${Status}' "$2" 2>/dev/null | grep -q 'ok installed' \
               || missing="$missing $2" ;;
        /*) [ -e "$1" ] || missing="$missing $2" ;;
        *) command -v "$1" >/dev/null 2>&1 || missing="$missing $2" ;;
    esac
}
case "$group" in
    test)
        need promtool prometheus
        need systemd-analyze systemd
        need redis-server redis-server
        ;;
    deb|deb-test)
        need dpkg-buildpackage dpkg-dev
        need - build-essential   # dpkg-buildpackage's implicit build dependency
        need dh debhelper
        need dh_virtualenv dh-virtualenv
        need /usr/bin/python3.11 python3.11
        need /usr/lib/python3.11/ensurepip/__init__.py python3.11-venv
        need lintian lintian
        need systemd-analyze systemd
        if [ "$group" = deb-test ]; then
            need debootstrap debootstrap
            need systemd-nspawn systemd-container
            need ip iproute2
            need /usr/share/keyrings/debian-archive-keyring.gpg debian-archive-keyring
        fi
        ;;
    *)
        echo "usage: $0 [test|deb|deb-test]" >&2
        exit 2
        ;;
esac
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages:$missing"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
