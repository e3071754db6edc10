#!/bin/bash
# Makes sure lxcfs serves /var/lib/lxcfs (README, "Honest resources"): the files the gateway mounts
# over a runc sandbox's /proc so that free, top, os.cpus() and os.cpu_count() show its own limits.
# Installs Debian's lxcfs when missing and starts it as a daemon, its pid file and log under the state
# folder. Never starts a second one over a live mount.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

LXCFS_DIR=/var/lib/lxcfs
mounted() { grep -q " $LXCFS_DIR fuse.lxcfs " /proc/self/mounts; }
# A dead lxcfs leaves its mount behind, and every read of it fails (ENOTCONN).
serving() { mounted && timeout 5 cat "$LXCFS_DIR/proc/uptime" >/dev/null 2>&1; }

serving && exit 0
command -v lxcfs >/dev/null || apt_install lxcfs
# The package's own service may have started it.
wait_for 3 serving && exit 0
[[ $(id -u) == 0 ]] || die "lxcfs does not serve $LXCFS_DIR and starting it needs root (or set SANDBOX_LXCFS=off)"
[[ -c /dev/fuse ]] || die "lxcfs needs FUSE and /dev/fuse is missing: modprobe fuse (or set SANDBOX_LXCFS=off)"
if mounted; then
    say "unmounting the stale lxcfs mount at $LXCFS_DIR"
    fusermount3 -u "$LXCFS_DIR" 2>/dev/null || umount -l "$LXCFS_DIR"
fi
mkdir -p "$LXCFS_DIR" "$STATE_DIR"
say "starting lxcfs on $LXCFS_DIR (log: $STATE_DIR/lxcfs.log)"
# --enable-cfs: CPU counts follow the CPU quota as well as the cpuset; -l: a load average of the
# sandbox's own. lxcfs 5 stays in the foreground.
setsid nohup lxcfs --enable-cfs --enable-loadavg --pidfile "$STATE_DIR/lxcfs.pid" "$LXCFS_DIR" \
    >>"$STATE_DIR/lxcfs.log" 2>&1 </dev/null &
wait_for 10 serving || die "lxcfs did not serve $LXCFS_DIR within 10 s; see $STATE_DIR/lxcfs.log"
