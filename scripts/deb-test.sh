#!/usr/bin/env bash
# The full packaging test (make deb-test): install a built relayd .deb into a fresh
# Debian 12 root made with debootstrap, and check
#   - the installed files, their owners and modes, the relayd user and group;
#   - the unit's exact ExecStartPre, ExecStart, ExecReload and stop (KillSignal) as
#     systemd would run them: as user relayd, with the unit's capabilities, environment
#     and umask, no new privileges, a read-only file system (ProtectSystem=strict),
#     private /tmp and /dev, an empty /home and /root, and a hidepid'ed /proc with
#     subset=pid: relayd starts, sends READY=1,
#     answers on its port, reloads a changed configuration (a TLS listener on port 443
#     included) and refuses an invalid one, relays to an upstream, and drains an
#     active stream on SIGTERM before exiting 0;
#   - reinstalling over itself (the upgrade path of the maintainer scripts);
#   - that remove, then purge, leave the root exactly as it was before the install.
# systemd itself does not run in the chroot: the directives it alone enforces
# (seccomp filters, namespaces, kernel protections) are checked statically by
# tests/packaging (systemd-analyze). docs/packaging.md has the list.
#
# Usage (as root): scripts/deb-test.sh build/deb/relayd_0.1.0-1_amd64.deb
# Environment: DEB_TEST_MIRROR (default http://deb.debian.org/debian),
#   DEB_TEST_KEEP=1 (keep the work directory), TMPDIR (where the root is made),
#   DEB_TEST_BASE=DIR (copy DIR, a root debootstrapped earlier, instead of running
#   debootstrap: faster when iterating; the real test starts from debootstrap).
#
# Every mount is made inside a private mount namespace (unshare), so none outlives
# the test, and every process it starts in the root runs in a private PID namespace
# that is torn down (all its processes killed) when the phase ends. Each phase and
# each wait is bounded by a timeout.
set -euo pipefail

SELF=$(readlink -f "$0")
SUITE=bookworm
MIRROR=${DEB_TEST_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/venvs/relayd
UNIT=/lib/systemd/system/relayd.service
CLIENT_KEY=sk-deb-test-client
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C.UTF-8

log() { printf '%s deb-test: %s\n' "$(date +%T)" "$*"; }
ok() { printf '  ok    %s\n' "$*" | tee -a "$RESULTS"; }
bad() { printf '  FAIL  %s\n' "$*" | tee -a "$RESULTS"; }
skip() { printf '  SKIP  %s\n' "$*" | tee -a "$RESULTS"; }
# check DESCRIPTION COMMAND...: one result line; the command's output goes to the log.
check() {
    local desc=$1
    shift
    if "$@" >>"$WORK/checks.log" 2>&1; then ok "$desc"; else bad "$desc (see checks.log)"; fi
}
# same DESCRIPTION EXPECTED ACTUAL: one result line; a mismatch is logged.
same() {
    if [ "$2" = "$3" ]; then ok "$1"; else
        printf '%s: expected %q, got %q\n' "$1" "$2" "$3" >>"$WORK/checks.log"
        bad "$1 (got '$3'; see checks.log)"
    fi
}
# A command in the root, as root, with a clean environment.
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH="$PATH" LC_ALL=C.UTF-8 HOME=/root \
        PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive "$@"
}
# wait_for SECONDS COMMAND...: poll until the command succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# -- phase: dependencies (private mount namespace; network) --------------------------------

phase_deps() {
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"
    local depends
    depends=$(dpkg-deb -f "$DEB" Depends)
    log "installing the package's Depends with apt: $depends"
    timeout 600 chroot "$ROOT" /usr/bin/env -i PATH="$PATH" DEBIAN_FRONTEND=noninteractive \
        apt-get -q update >>"$WORK/apt.log" 2>&1
    timeout 900 chroot "$ROOT" /usr/bin/env -i PATH="$PATH" DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y --no-install-recommends satisfy "$depends" >>"$WORK/apt.log" 2>&1
    in_root apt-get -q clean
}

# -- phase: install, run, remove, purge (private mount, PID and network namespaces) --------

mounts_for_root() {
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
}

phase_main() {
    trace_to "$WORK/trace-main.log"
    mounts_for_root
    ip link set lo up
    local deb_in_root
    deb_in_root=/tmp/$(basename "$DEB")
    cp "$DEB" "$ROOT$deb_in_root"

    log "dpkg -i (first install)"
    check "dpkg -i installs the package" in_root dpkg -i "$deb_in_root"
    # shellcheck disable=SC2016  # ${Status} is dpkg-query's
    check "package state is 'install ok installed'" \
        test "$(in_root dpkg-query -W -f='${Status}' relayd)" = "install ok installed"
    check_installed

    log "running the unit's command lines (systemd-like sandbox)"
    if timeout 600 unshare --mount --propagation private bash "$SELF" --phase runtime; then
        ok "runtime phase completed"
    else
        bad "runtime phase exited with status $?"
    fi

    log "dpkg -i again (reinstall: the upgrade path of prerm/postinst)"
    printf '# a local change that an upgrade must keep\n' >>"$ROOT/etc/relayd.yaml"
    check "dpkg -i over the installed package" in_root dpkg -i "$deb_in_root"
    check "the admin's change to the conffile is kept" \
        grep -q '^# a local change that an upgrade must keep' "$ROOT/etc/relayd.yaml"
    check_installed
    rm -f "$ROOT$deb_in_root"

    log "dpkg -r"
    check "dpkg -r removes the package" in_root dpkg -r relayd
    check "the venv is gone" test ! -e "$ROOT$VENV"
    check "/opt/venvs is gone" test ! -e "$ROOT/opt/venvs"
    check "relayd-checkconfig is gone" test ! -e "$ROOT/usr/bin/relayd-checkconfig"
    check "the unit is gone" test ! -e "$ROOT$UNIT"
    check "/usr/share/relayd (dashboard, rules) is gone" test ! -e "$ROOT/usr/share/relayd"
    check "the conffile stays until purge" test -f "$ROOT/etc/relayd.yaml"
    check "the relayd user stays until purge" in_root getent passwd relayd

    log "dpkg -P"
    check "dpkg -P purges the package" in_root dpkg -P relayd
    check "the conffile is gone" test ! -e "$ROOT/etc/relayd.yaml"
    check "the relayd user is gone" not in_root getent passwd relayd
    check "the relayd group is gone" not in_root getent group relayd
    check "the statoverride is gone" not grep -q relayd "$ROOT/var/lib/dpkg/statoverride"
    check "no systemd enablement is left" \
        test -z "$(find "$ROOT/etc/systemd" "$ROOT/var/lib/systemd" -name '*relayd*' 2>/dev/null)"
    check "dpkg knows nothing of relayd" not in_root dpkg-query -W relayd
}

not() { ! "$@"; }
# gone PID: the process has exited (a zombie child counts as exited).
gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

check_installed() {
    local stat
    check "twistd is in the venv" test -x "$ROOT$VENV/bin/twistd"
    check "the venv's python is Debian's python3.11" \
        test "$(readlink "$ROOT$VENV/bin/python3.11")" = /usr/bin/python3.11
    check "/usr/bin/relayd-checkconfig runs" in_root /usr/bin/relayd-checkconfig --help
    check "the unit is installed" test -f "$ROOT$UNIT"
    check "the Grafana dashboard is installed" \
        test -s "$ROOT/usr/share/relayd/grafana/relayd.json"
    check "the Grafana dashboard is valid JSON" \
        in_root /usr/bin/python3.11 -c 'import json, sys; json.load(open(sys.argv[1]))' \
        /usr/share/relayd/grafana/relayd.json
    check "the Prometheus rules are installed" \
        test -s "$ROOT/usr/share/relayd/prometheus/relayd-rules.yml"
    stat=$(in_root stat -c '%U:%G %a' /etc/relayd.yaml)
    check "/etc/relayd.yaml is root:relayd 0640 (got $stat)" test "$stat" = "root:relayd 640"
    check "/etc/relayd.yaml is a conffile" \
        bash -c "chroot '$ROOT' dpkg-query -W -f='\${Conffiles}' relayd | grep -q ' /etc/relayd.yaml '"
    check "relayd is a system user with no login and no home" \
        bash -c "chroot '$ROOT' getent passwd relayd | awk -F: '\$3 < 1000 && \$6 == \"/nonexistent\" && \$7 == \"/usr/sbin/nologin\"' | grep -q ."
    check "relayd's group is relayd" \
        test "$(in_root id -gn relayd)" = relayd
    check "relayd-checkconfig accepts the shipped config" \
        in_root /usr/bin/relayd-checkconfig -c /etc/relayd.yaml
    # The first release's .deb lacked two packages; every module of relayd must import
    # from the installed venv (not only what checkconfig and the unit happen to load).
    check "every relayd module imports from the installed venv" \
        in_root "$VENV/bin/python" -c 'import importlib, pkgutil, relayd
assert relayd.__file__.startswith("/opt/venvs/relayd/"), relayd.__file__
for m in pkgutil.walk_packages(relayd.__path__, "relayd."): importlib.import_module(m.name)' 
    check "the Twisted plugin cache exists" \
        test -s "$ROOT$VENV/lib/python3.11/site-packages/twisted/plugins/dropin.cache"
    check "byte code is compiled" \
        test -f "$ROOT$VENV/lib/python3.11/site-packages/relayd/__pycache__/service.cpython-311.pyc"
    check "the service is enabled (deb-systemd-helper)" \
        test "$(readlink "$ROOT/etc/systemd/system/multi-user.target.wants/relayd.service")" = "$UNIT"
    check "nothing in the venv is writable by relayd or by others" \
        test -z "$(in_root find "$VENV" ! -type l \( -user relayd -o -group relayd -o -perm -o+w \))"
}

# -- phase: runtime (nested private mount namespace: the sandbox) --------------------------

# unit_line KEY: the value of KEY= in the installed unit (exactly one line).
unit_line() {
    local values
    values=$(grep "^$1=" "$ROOT$UNIT" | cut -d= -f2-)
    [ "$(printf '%s\n' "$values" | wc -l)" -eq 1 ] || { echo "$1= is not one line" >&2; return 1; }
    printf '%s\n' "$values"
}

# SERVICE: the command prefix that runs a command in the root the way the unit runs its
# commands. A plain command, so that "${SERVICE[@]}" CMD & gives $! = CMD's own PID
# (chroot, env, python, setpriv and sh each exec the next).
service_prefix() {
    local -a environment mdwe=()
    read -r -a environment <<<"$(unit_line Environment)"
    if grep -qx 'MemoryDenyWriteExecute=yes' "$ROOT$UNIT"; then
        mdwe=(/usr/bin/python3.11 -c "$MDWE_EXEC")
    fi
    # shellcheck disable=SC2054  # the commas are setpriv's
    SERVICE=(chroot "$ROOT" /usr/bin/env -i
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        HOME=/nonexistent USER=relayd LOGNAME=relayd SHELL=/usr/sbin/nologin
        NOTIFY_SOCKET=/run/relayd-notify "${environment[@]}" "${mdwe[@]}"
        /usr/bin/setpriv --reuid=relayd --regid=relayd --init-groups --no-new-privs
        --bounding-set=-all,+net_bind_service --inh-caps=-all,+net_bind_service
        --ambient-caps=-all,+net_bind_service
        /bin/sh -c 'umask 0077 && cd / && exec "$@"' relayd.service)
}
as_service() { "${SERVICE[@]}" "$@"; }
# MemoryDenyWriteExecute=yes, if the unit has it, as systemd 253+ enforces it:
# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), kept across execve (Linux 6.3+;
# skipped, and said so, on older kernels). The unit does not set it (TLS needs W+X
# memory, see its comment): this is what found that out.
MDWE_EXEC='
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    print("deb-test: PR_SET_MDWE unavailable, MemoryDenyWriteExecute not emulated", file=sys.stderr)
os.execv(sys.argv[1], sys.argv[1:])
'

sandbox_mounts() {
    # An alias of /etc that stays writable, for the test to change the configuration.
    mount --bind "$ROOT/etc" "$WORK/etc-rw"
    # ProtectSystem=strict: the whole root read-only.
    mount --bind "$ROOT" "$ROOT"
    mount -o remount,bind,ro "$ROOT"
    # ProtectProc=invisible, ProcSubset=pid.
    mount -t proc -o hidepid=invisible,subset=pid proc "$ROOT/proc"
    # PrivateDevices: a minimal /dev.
    mount -t tmpfs -o mode=0755,nosuid tmpfs "$ROOT/dev"
    local node
    for node in null zero full random urandom tty; do
        touch "$ROOT/dev/$node"
        mount --bind "/dev/$node" "$ROOT/dev/$node"
    done
    mkdir "$ROOT/dev/shm" && mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/dev/shm"
    # PrivateTmp; /run for the notify socket; ProtectHome.
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/tmp"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/var/tmp"
    mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
    mount -t tmpfs -o ro,mode=0000 tmpfs "$ROOT/root"
    mount -t tmpfs -o ro,mode=0000 tmpfs "$ROOT/home"
}

write_config() {  # write_config FILE TLS(yes/no) [EXTRA]
    local tls_listener=""
    [ "$2" = yes ] && tls_listener='
  - address: "127.0.0.1:443"
    tls: {certificate: /etc/relayd/tls/fullchain.pem, private_key: /etc/relayd/tls/privkey.pem}'
    cat >"$1" <<EOF
listen:
  - address: "127.0.0.1:8080"$tls_listener
admin:
  address: "127.0.0.1:9091"
shutdown_timeout: 30
clients:
  - name: deb-test
    key_sha256: "$(printf %s "$CLIENT_KEY" | sha256sum | cut -d' ' -f1)"
providers:
  - name: anthropic
    type: anthropic
    health: {enabled: false}
    backends:
      - {name: fake, url: "http://127.0.0.1:8900", api_key: "sk-upstream-deb-test"}
  - name: openai
    type: openai
    health: {enabled: false}
    backends:
      - {name: fake, url: "http://127.0.0.1:8900", api_key: "sk-upstream-deb-test"}
routes:
  - {api: anthropic, provider: anthropic}
  - {api: openai, provider: openai}
${3:-}
EOF
}

trace_to() {  # trace_to FILE: bash -x of this phase into FILE
    exec {trace_fd}>>"$1"
    BASH_XTRACEFD=$trace_fd
    set -x
}

phase_runtime() {
    trace_to "$WORK/trace-runtime.log"
    local pids=()
    ETC_RW=$WORK/etc-rw
    # shellcheck disable=SC2317  # called by the trap
    end_runtime() {
        local pid
        for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
        # Put the shipped config back and remove the test's own files (the purge check
        # compares the root with its state before the install).
        if mountpoint -q "$ETC_RW"; then
            cp "$WORK/relayd.yaml.shipped" "$ETC_RW/relayd.yaml"
            rm -rf "$ETC_RW/relayd"
        else
            cp "$WORK/relayd.yaml.shipped" "$ROOT/etc/relayd.yaml"
            rm -rf "$ROOT/etc/relayd"
        fi
    }
    trap end_runtime EXIT

    # Test-only TLS material, made before the root goes read-only.
    in_root "$VENV/bin/python" -c 'from pathlib import Path
from relayd.testing.certs import make_certificates
make_certificates(Path("/etc/relayd/tls"))'
    in_root chgrp -R relayd /etc/relayd
    chmod 0750 "$ROOT/etc/relayd" "$ROOT/etc/relayd/tls"
    chmod 0640 "$ROOT"/etc/relayd/tls/*.pem
    cp "$ROOT/etc/relayd/tls/ca.pem" "$WORK/ca.pem"
    cp "$ROOT/etc/relayd.yaml" "$WORK/relayd.yaml.shipped"

    sandbox_mounts
    check "the root is read-only in the sandbox" not touch "$ROOT/opt/deb-test-write"

    # The notify socket systemd would give the service.
    python3 "$WORK/client.py" notify "$ROOT/run/relayd-notify" "$WORK/notify.log" &
    pids+=($!)
    wait_for 10 test -S "$ROOT/run/relayd-notify" || true
    # The upstream: relayd's fake provider (from the venv), as nobody.
    chroot "$ROOT" /usr/bin/env -i PATH="$PATH" PYTHONDONTWRITEBYTECODE=1 \
        /usr/bin/setpriv --reuid=nobody --regid=nogroup --clear-groups \
        "$VENV/bin/relayd-fake-upstream" --listen 127.0.0.1:8900 \
        --config '{"chunk_delay": 0.25, "chunks": 16}' >"$WORK/fake-upstream.log" 2>&1 &
    pids+=($!)

    local exec_start_pre exec_start exec_reload kill_signal stop_timeout
    exec_start_pre=$(unit_line ExecStartPre)
    exec_start=$(unit_line ExecStart)
    exec_reload=$(unit_line ExecReload)
    kill_signal=$(unit_line KillSignal)
    stop_timeout=$(unit_line TimeoutStopSec)
    stop_timeout=${stop_timeout%s}
    local -a pre_argv start_argv
    read -r -a pre_argv <<<"$exec_start_pre"
    read -r -a start_argv <<<"$exec_start"
    service_prefix

    check "ExecStartPre ($exec_start_pre) accepts the shipped config as relayd" \
        as_service "${pre_argv[@]}"

    log "ExecStart: $exec_start"
    "${SERVICE[@]}" "${start_argv[@]}" >"$WORK/relayd.log" 2>&1 &
    local mainpid=$!
    pids+=("$mainpid")
    check "relayd sends READY=1" wait_for 60 grep -q '^READY=1' "$WORK/notify.log"
    check "relayd runs as user relayd" \
        bash -c "grep -E '^Uid:' /proc/$mainpid/status | awk '{exit !(\$2 == \$3 && \$2 == $(in_root id -u relayd))}'"
    check "relayd runs with the command line of ExecStart" \
        test "$(tr '\0' ' ' </proc/"$mainpid"/cmdline)" = "$VENV/bin/python $exec_start "
    check "relayd has CAP_NET_BIND_SERVICE and no other capability" \
        grep -qx $'CapEff:\t0000000000000400' "/proc/$mainpid/status"
    check "relayd has no_new_privs" grep -qx $'NoNewPrivs:\t1' "/proc/$mainpid/status"
    check "relayd answers on 127.0.0.1:8080 (401 without a key)" \
        test "$(python3 "$WORK/client.py" status http://127.0.0.1:8080/v1/models)" = 401
    check "relayd logs its listener" \
        grep -q '^\[relayd.service#info\] relayd listening on http://127.0.0.1:8080$' "$WORK/relayd.log"
    check "log lines carry no timestamp (journald adds its own)" \
        not grep -qE '^[0-9]{4}-[0-9]{2}-[0-9]{2}' "$WORK/relayd.log"

    log "ExecReload: $exec_reload (new config: TLS on port 443, admin, a client and a provider)"
    write_config "$ETC_RW/relayd.yaml" yes
    check "ExecStartPre accepts the changed config" as_service "${pre_argv[@]}"
    local -a reload_argv
    read -r -a reload_argv <<<"${exec_reload//\$MAINPID/$mainpid}"
    check "ExecReload exits 0" as_service "${reload_argv[@]}"
    check "relayd reloads the changed config" \
        wait_for 30 grep -q 'configuration reloaded: 1 clients, 2 providers, 2 backends, 2 routes' \
        "$WORK/relayd.log"
    check "relayd sends RELOADING=1, then READY=1 again" \
        wait_for 10 bash -c "grep -A1 '^RELOADING=1' '$WORK/notify.log' | tail -n +2 | grep -q . &&
            test \$(grep -c '^READY=1' '$WORK/notify.log') -ge 2"
    check "TLS on port 443 (CAP_NET_BIND_SERVICE), HTTP/2 offered by ALPN" \
        test "$(python3 "$WORK/client.py" alpn 127.0.0.1 443 "$WORK/ca.pem")" = h2
    check "a request relayed over https://127.0.0.1:443 gets the upstream's answer" \
        python3 "$WORK/client.py" message https://127.0.0.1:443 "$CLIENT_KEY" "$WORK/ca.pem"
    check "an OpenAI chat completion relayed over http://127.0.0.1:8080 gets the answer" \
        python3 "$WORK/client.py" chat http://127.0.0.1:8080 "$CLIENT_KEY"
    check "the admin listener counts the reload" \
        bash -c "python3 '$WORK/client.py' get http://127.0.0.1:9091/metrics |
            grep -q '^relayd_config_reloads_total{result=\"ok\"} 1.0$'"

    log "ExecReload with an invalid config"
    write_config "$ETC_RW/relayd.yaml" yes "bogus_key: 1"
    check "ExecStartPre rejects the invalid config" not as_service "${pre_argv[@]}"
    check "ExecReload exits 0" as_service "${reload_argv[@]}"
    check "relayd rejects the invalid config and keeps the old one" \
        wait_for 30 grep -q 'reload rejected: bogus_key: unknown key' "$WORK/relayd.log"
    check "relayd still relays" \
        python3 "$WORK/client.py" message http://127.0.0.1:8080 "$CLIENT_KEY"

    log "stop ($kill_signal) during a stream: the drain"
    python3 "$WORK/client.py" stream http://127.0.0.1:8080 "$CLIENT_KEY" "$WORK/stream.out" &
    local client=$!
    pids+=("$client")
    wait_for 20 grep -q 'content_block_delta' "$WORK/stream.out" || true
    local started=$SECONDS
    kill -s "${kill_signal#SIG}" "$mainpid"
    local status=0
    if wait_for "$stop_timeout" gone "$mainpid"; then
        wait "$mainpid" || status=$?
        ok "relayd exits within TimeoutStopSec=${stop_timeout}s (took $((SECONDS - started))s)"
        check "relayd exits with status 0 after the drain (got $status)" test "$status" = 0
    else
        bad "relayd still runs after TimeoutStopSec=${stop_timeout}s"
    fi
    check "relayd sends STOPPING=1" grep -q '^STOPPING=1' "$WORK/notify.log"
    check "relayd logs the drain" grep -q 'draining 1 in-flight requests' "$WORK/relayd.log"
    wait_for 30 gone "$client" || true
    check "the stream in flight at the stop completes (message_stop)" \
        grep -q '^event: message_stop' "$WORK/stream.out"
    check "no traceback or write error in relayd's log" \
        not grep -qiE 'traceback|unable to write|read-only file system|permission denied' \
        "$WORK/relayd.log"
}

# -- phase: real systemd (systemd-nspawn boots the root) -------------------------------------

# in_ct COMMAND...: run COMMAND inside the booted container, as root.
in_ct() {
    nsenter -t "$CT_INIT" -a /usr/bin/env -i PATH="$PATH" LC_ALL=C.UTF-8 HOME=/root \
        PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive "$@"
}

# The PID of the container's systemd: a process named systemd below our nspawn.
find_container_init() {
    local pid parent
    for pid in $(pgrep -x systemd); do
        parent=$pid
        while [ "$parent" -gt 1 ]; do
            parent=$(awk '/^PPid:/ {print $2}' "/proc/$parent/status" 2>/dev/null || echo 1)
            if [ "$parent" = "$NSPAWN_PID" ]; then
                echo "$pid"
                return 0
            fi
        done
    done
    return 1
}

phase_systemd_deps() {
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"
    timeout 900 chroot "$ROOT" /usr/bin/env -i PATH="$PATH" DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y --no-install-recommends install systemd systemd-sysv dbus curl \
        >>"$WORK/apt.log" 2>&1
    in_root apt-get -q clean
}

boot_container() {
    # On a host without systemd, /run is not a tmpfs and nspawn refuses to use it: give
    # it a private one (in its own mount namespace, so the host sees nothing).
    local run_tmpfs=""
    [ -d /run/systemd/system ] || run_tmpfs='mount -t tmpfs -o mode=0755 tmpfs /run && '
    unshare --mount --propagation private sh -c "${run_tmpfs}exec systemd-nspawn -q \
        -D '$ROOT' --register=no --keep-unit --private-network --boot" \
        >"$WORK/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    local deadline=$((SECONDS + 90)) state=""
    CT_INIT=""
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; do
        [ -n "$CT_INIT" ] || CT_INIT=$(find_container_init || true)
        if [ -n "$CT_INIT" ]; then
            state=$(in_ct systemctl is-system-running 2>/dev/null || true)
            case "$state" in running|degraded) return 0 ;; esac
        fi
        sleep 1
    done
    echo "container did not boot (state: ${state:-none})"
    return 1
}

stop_container() {
    [ -n "${NSPAWN_PID:-}" ] || return 0
    kill "$NSPAWN_PID" 2>/dev/null || true   # nspawn powers the container off
    local deadline=$((SECONDS + 60))
    while kill -0 "$NSPAWN_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
    kill -9 "$NSPAWN_PID" 2>/dev/null || true
    wait "$NSPAWN_PID" 2>/dev/null || true
    NSPAWN_PID=""
}

# A Messages call over HTTP/2 and TLS on port 443, in the container: "2 200" when relayed.
h2_message_over_tls() {
    in_ct curl -s --http2 --cacert /etc/relayd/tls/ca.pem -o /dev/null \
        -w '%{http_version} %{http_code}' -H "x-api-key: $CLIENT_KEY" \
        -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \
        -d '{"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]}' \
        https://127.0.0.1:443/v1/messages
}

systemd_checks() {
    local deb_in_root fake mainpid exposure
    deb_in_root=/root/$(basename "$DEB")
    cp "$DEB" "$ROOT$deb_in_root"
    check "[systemd] dpkg -i installs and starts relayd" in_ct dpkg -i "$deb_in_root"
    check "[systemd] relayd.service is active" wait_for 30 in_ct systemctl is-active relayd
    check "[systemd] relayd.service is enabled" in_ct systemctl is-enabled relayd
    mainpid=$(in_ct systemctl show -P MainPID relayd)
    check "[systemd] the main process runs as relayd" \
        test "$(in_ct ps -o user= -p "$mainpid")" = relayd
    check "[systemd] status is relayd's own (sd_notify STATUS=serving)" \
        test "$(in_ct systemctl show -P StatusText relayd)" = serving
    check "[systemd] relayd answers on 127.0.0.1:8080" \
        test "$(in_ct curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models)" = 401
    exposure=$(in_ct systemd-analyze security relayd.service --no-pager | sed -n 's/.*Overall exposure level for relayd.service: \([0-9.]*\) .*/\1/p')
    check "[systemd] systemd-analyze security of the running unit: exposure $exposure (<= 2.0)" \
        awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }'
    check "[systemd] journal lines carry only journald's timestamp" \
        bash -c "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager |
            grep -q '^\[relayd.service#info\] relayd listening on http://127.0.0.1:8080$'"

    # TLS on 443, a client and an upstream (the fake provider, as nobody), by reload.
    in_ct "$VENV/bin/python" -c 'from pathlib import Path
from relayd.testing.certs import make_certificates
make_certificates(Path("/etc/relayd/tls"))' >>"$WORK/checks.log" 2>&1
    in_ct chgrp -R relayd /etc/relayd
    in_ct chmod 0750 /etc/relayd /etc/relayd/tls
    in_ct sh -c 'chmod 0640 /etc/relayd/tls/*.pem'
    cp "$ROOT/etc/relayd.yaml" "$WORK/relayd.yaml.shipped"
    write_config "$ROOT/etc/relayd.yaml" yes
    nsenter -t "$CT_INIT" -a /usr/bin/setpriv --reuid=nobody --regid=nogroup --clear-groups \
        /usr/bin/env -i PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/relayd-fake-upstream" \
        --listen 127.0.0.1:8900 --config '{"chunk_delay": 0.25, "chunks": 80}' \
        >"$WORK/fake-upstream-systemd.log" 2>&1 &
    fake=$!
    check "[systemd] the fake upstream runs" \
        wait_for 30 in_ct curl -sf http://127.0.0.1:8900/_fake/health
    check "[systemd] systemctl reload relayd" in_ct systemctl reload relayd
    check "[systemd] the reload is applied" wait_for 30 bash -c \
        "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager | grep -q 'configuration reloaded: 1 clients'"
    check "[systemd] same main process after the reload" \
        test "$(in_ct systemctl show -P MainPID relayd)" = "$mainpid"
    same "[systemd] HTTP/2 over TLS on port 443 relays to the upstream" "2 200" \
        "$(h2_message_over_tls)"
    same "[systemd] an OpenAI chat completion relays to the upstream" "200" \
        "$(in_ct curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $CLIENT_KEY" \
            -H 'content-type: application/json' \
            -d '{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}' \
            http://127.0.0.1:8080/v1/chat/completions)"
    check "[systemd] access lines are batched, and that request's line reaches the journal" \
        wait_for 10 bash -c "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager |
            grep -q '^\[relayd.logs#info\] access lines are written in batches' &&
            nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager |
            grep -q '^\[relayd.access#info\] access .* path=/v1/chat/completions .* status=200 '"

    # workers: auto. One process cannot become a daemon by reload: a restart. Then the
    # daemon is the main process, with one worker per CPU, and reloads keep it.
    local ncpu
    ncpu=$(in_ct nproc)
    write_config "$ROOT/etc/relayd.yaml" yes "workers: auto"
    check "[systemd] systemctl restart relayd (workers: auto)" in_ct systemctl restart relayd
    check "[systemd] relayd.service is active with workers" in_ct systemctl is-active relayd
    mainpid=$(in_ct systemctl show -P MainPID relayd)
    same "[systemd] STATUS once every worker serves" "serving with $ncpu workers" \
        "$(in_ct systemctl show -P StatusText relayd)"
    same "[systemd] the main process has one worker per CPU" "$ncpu" \
        "$(in_ct pgrep -c -P "$mainpid")"
    same "[systemd] the workers relay HTTP/2 over TLS on port 443" "2 200" \
        "$(h2_message_over_tls)"
    check "[systemd] systemctl reload relayd (workers)" in_ct systemctl reload relayd
    check "[systemd] the daemon reports the reload once" wait_for 30 bash -c \
        "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager | grep -q '^\[relayd.workers#info\] configuration reloaded: 1 clients, 2 providers, 2 routes, $ncpu workers\$'"
    check "[systemd] same main process after the reload (workers)" \
        test "$(in_ct systemctl show -P MainPID relayd)" = "$mainpid"
    check "[systemd] worker lines carry their index" bash -c \
        "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager | grep -q '^\[relayd.service#info worker=0\] configuration applied:'"

    # The upgrade path with a stream in flight: dpkg -i over the installed package restarts
    # the service (dh_installsystemd), and the restart's stop drains the stream. The
    # stream lasts 80 x 0.25 s = 20 s: longer than the unpack, shorter than the drain.
    in_ct sh -c "curl -sN -H 'x-api-key: $CLIENT_KEY' -H 'anthropic-version: 2023-06-01' \
        -H 'content-type: application/json' \
        -d '{\"model\": \"claude-sonnet-4-5\", \"max_tokens\": 80, \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}' \
        http://127.0.0.1:8080/v1/messages > /root/stream.out" &
    local client=$!
    wait_for 20 grep -q content_block_delta "$ROOT/root/stream.out" || true
    check "[systemd] dpkg -i over itself (upgrade) during a stream" in_ct dpkg -i "$deb_in_root"
    wait_for 60 gone "$client" || true
    check "[systemd] the upgrade restarted relayd (new main process)" \
        test "$(in_ct systemctl show -P MainPID relayd)" != "$mainpid"
    check "[systemd] relayd.service is active after the upgrade" in_ct systemctl is-active relayd
    check "[systemd] the restart drained the stream" bash -c \
        "nsenter -t $CT_INIT -a journalctl -u relayd -o cat --no-pager | grep -q 'draining 1 in-flight requests'"
    check "[systemd] the stream in flight during the upgrade completed (message_stop)" \
        grep -q '^event: message_stop' "$ROOT/root/stream.out"
    check "[systemd] no SIGKILL and no failure" bash -c \
        "! nsenter -t $CT_INIT -a journalctl -u relayd --no-pager | grep -qiE 'sigkill|failed with result|timed out'"

    check "[systemd] systemctl stop relayd" in_ct systemctl stop relayd
    check "[systemd] relayd exited 0 (Result=success)" \
        test "$(in_ct systemctl show -P Result relayd) $(in_ct systemctl show -P ExecMainStatus relayd)" = "success 0"
    kill "$fake" 2>/dev/null || true
    wait "$fake" 2>/dev/null || true
    cp "$WORK/relayd.yaml.shipped" "$ROOT/etc/relayd.yaml"
    rm -rf "$ROOT/etc/relayd" "$ROOT/root/stream.out"
    check "[systemd] dpkg -P purges relayd" in_ct dpkg -P relayd
    check "[systemd] systemd no longer knows relayd.service" \
        bash -c "nsenter -t $CT_INIT -a systemctl daemon-reload &&
            ! nsenter -t $CT_INIT -a systemctl cat relayd.service >/dev/null 2>&1"
    rm -f "$ROOT$deb_in_root"
    nsenter -t "$CT_INIT" -a journalctl --no-pager >"$WORK/journal.log" 2>&1 || true
}

phase_systemd() {
    local mode=${DEB_TEST_SYSTEMD:-auto}
    [ "$mode" != no ] || { log "real-systemd phase disabled (DEB_TEST_SYSTEMD=no)"; return 0; }
    if ! command -v systemd-nspawn >/dev/null; then
        [ "$mode" = auto ] && { skip "real-systemd phase: systemd-nspawn missing"; return 0; }
        bad "real-systemd phase: systemd-nspawn missing"
        return 0
    fi
    log "installing systemd into the root for the real-systemd phase"
    timeout 1200 unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
        bash "$SELF" --phase systemd-deps || { bad "installing systemd in the root"; return 0; }
    log "booting the root with systemd-nspawn"
    if ! boot_container >>"$WORK/checks.log" 2>&1; then
        stop_container
        if [ "$mode" = auto ]; then
            skip "real-systemd phase: the root does not boot under systemd-nspawn here (nspawn.log)"
        else
            bad "real-systemd phase: the root does not boot under systemd-nspawn (nspawn.log)"
        fi
        return 0
    fi
    systemd_checks
    stop_container
}

# -- the client side (host python3) ----------------------------------------------------------

write_client() {
    cat >"$WORK/client.py" <<'EOF'
"""deb-test's client: HTTP checks against relayd and the notify socket listener."""
import json, socket, ssl, sys, urllib.error, urllib.request

def context(cafile):
    ctx = ssl.create_default_context(cafile=cafile) if cafile else None
    return ctx

def request(url, key=None, body=None, cafile=None):
    headers = {"content-type": "application/json", "anthropic-version": "2023-06-01"}
    if key:
        headers["x-api-key"] = key
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    return urllib.request.urlopen(req, timeout=30, context=context(cafile))

MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hi"}]}
cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "status":
    try:
        print(request(args[0]).status)
    except urllib.error.HTTPError as exc:
        print(exc.code)
elif cmd == "get":
    sys.stdout.write(request(args[0]).read().decode())
elif cmd == "message":
    reply = json.load(request(args[0] + "/v1/messages", args[1], MESSAGE, *args[2:]))
    assert reply["type"] == "message" and reply["content"][0]["text"], reply
elif cmd == "chat":
    headers = {"content-type": "application/json", "authorization": "Bearer " + args[1]}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    req = urllib.request.Request(args[0] + "/v1/chat/completions",
                                 data=json.dumps(body).encode(), headers=headers)
    reply = json.load(urllib.request.urlopen(req, timeout=30))
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
elif cmd == "stream":
    with open(args[2], "w") as out:
        response = request(args[0] + "/v1/messages", args[1], dict(MESSAGE, stream=True))
        for line in response:
            out.write(line.decode())
            out.flush()
elif cmd == "alpn":
    ctx = ssl.create_default_context(cafile=args[2])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((args[0], int(args[1])), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=args[0]) as tls:
            print(tls.selected_alpn_protocol())
elif cmd == "notify":
    import os
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(args[0])
    os.chmod(args[0], 0o666)
    with open(args[1], "a") as log:
        while True:
            log.write(sock.recv(4096).decode() + "\n")
            log.flush()
EOF
}

# -- the root's footprint --------------------------------------------------------------------

# Every path of the root with its type, mode and owner (contents for the account files),
# minus what apt, dpkg and logs change anyway, and the backups (/etc/passwd- etc.) that
# the shadow tools rotate on every account change, adduser's and deluser's included.
footprint() {
    (
        cd "$ROOT"
        find . -xdev \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
            -o -path ./tmp -o -path ./var/tmp -o -path ./var/cache -o -path ./var/log \
            -o -path ./var/lib/apt -o -path ./var/lib/dpkg -o -path ./etc/passwd- \
            -o -path ./etc/group- -o -path ./etc/shadow- -o -path ./etc/gshadow- \) -prune \
            -o -printf '%p %y %m %u:%g\n' | sort
        find ./var/lib/dpkg/info -name 'relayd*' | sort
        cat ./var/lib/dpkg/statoverride 2>/dev/null || true
        cat ./etc/passwd ./etc/group ./etc/shadow ./etc/gshadow
    )
}

# -- driver ----------------------------------------------------------------------------------

cleanup() {
    local status=$?
    set +e
    stop_container
    # Every mount is in a namespace that is gone by now; refuse to delete anything that
    # is still mounted, just in case.
    if grep -q " $WORK" /proc/self/mounts; then
        log "mounts left under $WORK; not deleting it"
        grep " $WORK" /proc/self/mounts
        status=1
    elif [ "${DEB_TEST_KEEP:-0}" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf --one-file-system "$WORK"
    fi
    exit "$status"
}

main() {
    [ "$#" -eq 1 ] || { echo "usage: $0 RELAYD.deb" >&2; exit 2; }
    [ "$(id -u)" -eq 0 ] || { echo "$0: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
    DEB=$(readlink -f "$1")
    [ -f "$DEB" ] || { echo "$0: no such file: $1" >&2; exit 2; }
    WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/relayd-deb-test.XXXXXX")
    ROOT=$WORK/root
    RESULTS=$WORK/results
    export DEB WORK ROOT RESULTS
    trap cleanup EXIT
    mkdir "$WORK/etc-rw"
    : >"$RESULTS"
    write_client
    local begin=$SECONDS

    if [ -n "${DEB_TEST_BASE:-}" ]; then
        log "copying $DEB_TEST_BASE to $ROOT (DEB_TEST_BASE)"
        cp -a "$DEB_TEST_BASE" "$ROOT"
    else
        log "debootstrap $SUITE into $ROOT ($MIRROR)"
        timeout 900 unshare --mount --propagation private \
            debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    fi
    timeout 1200 unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
        bash "$SELF" --phase deps || { tail -20 "$WORK/apt.log"; exit 1; }

    footprint >"$WORK/footprint.before"
    timeout 1500 unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
        --net bash "$SELF" --phase main || bad "main phase exited with status $?"
    footprint >"$WORK/footprint.after"
    if diff -u "$WORK/footprint.before" "$WORK/footprint.after" >"$WORK/footprint.diff"; then
        ok "after purge the root is as it was before the install"
    else
        bad "purge left differences (footprint.diff):"
        head -40 "$WORK/footprint.diff"
    fi

    phase_systemd

    local passed failed skipped
    passed=$(grep -c '^  ok' "$RESULTS" || true)
    failed=$(grep -c '^  FAIL' "$RESULTS" || true)
    skipped=$(grep -c '^  SKIP' "$RESULTS" || true)
    log "$(basename "$DEB") in $((SECONDS - begin))s"
    if [ "$failed" -ne 0 ]; then
        DEB_TEST_KEEP=1
        grep '^  FAIL' "$RESULTS"
    fi
    grep '^  SKIP' "$RESULTS" || true
    echo "deb-test: $passed passed, $failed failed, $skipped skipped"
    [ "$failed" -eq 0 ]
}

if [ "${1:-}" = --phase ]; then
    case "$2" in
        deps) phase_deps ;;
        main) phase_main ;;
        runtime) phase_runtime ;;
        systemd-deps) phase_systemd_deps ;;
        *) echo "unknown phase $2" >&2; exit 2 ;;
    esac
else
    main "$@"
fi
