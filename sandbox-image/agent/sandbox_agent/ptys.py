"""The pty under a terminal: its setup (controlling terminal, line discipline, size) and where the
kernel's line discipline falls short (gVisor's), the keys that should be signals."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios

from . import spawn

# The keys a line discipline turns into signals, as `stty sane` sets them.
SIGNAL_OF = {termios.VINTR: signal.SIGINT, termios.VQUIT: signal.SIGQUIT, termios.VSUSP: signal.SIGTSTP}
SIGNAL_KEYS = frozenset((0x03, 0x1C, 0x1A))


def stat(pid: int) -> tuple[int, int, int, int]:
    """From /proc/<pid>/stat: process group, session, terminal and the terminal's foreground group
    as the kernel sees them (-1 each: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5])
    except (OSError, ValueError, IndexError):
        return -1, -1, -1, -1


def take_terminal() -> None:
    """In the child, after setsid and the switch to the user: the pty on fd 0 becomes its controlling
    terminal, which job control, Ctrl-C and /dev/tty need."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# Not in Python's termios module (Linux's value).
IUTF8 = 0o40000


def sane(fd: int) -> None:
    """The line discipline as `stty sane` leaves it (Ctrl-C shown as ^C and sent as SIGINT, CR to NL,
    UTF-8 erase): what Linux gives a new pty, and what gVisor's differs from."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag |= termios.BRKINT | termios.ICRNL | termios.IXON | IUTF8
    iflag &= ~(termios.INLCR | termios.IGNCR)
    oflag |= termios.OPOST | termios.ONLCR
    cflag |= termios.CREAD | termios.CS8
    lflag |= termios.ISIG | termios.ICANON | termios.IEXTEN | termios.ECHO | termios.ECHOE | termios.ECHOK
    lflag |= termios.ECHOCTL | termios.ECHOKE
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


def set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def signal_keys(master: int, shell_pid: int, tag: int, data: bytes) -> tuple[bytes, bytes]:
    """Ctrl-C, Ctrl-\\ and Ctrl-Z where the kernel's pty does not turn them into signals: gVisor's
    (as of 2022) neither knows the pty as the shell's controlling terminal (its stat shows neither
    a terminal nor a foreground group) nor signals anyone. There the agent does it, the key dropped
    and "^C" echoed, guessing the foreground group it cannot ask for: while the line discipline is
    canonical, a command runs (bash's readline turns that off at its prompt), so the newest job of
    the session; else the shell's own group. A known limit: a program that reads keys one by one in a job of
    its own (a REPL) gets nothing, its shell the signal; a gVisor with TIOCGPGRP would fix it.
    Where the kernel knows its terminal, the keys go through untouched. The input to write, and
    what to echo."""
    # No terminal at all, not merely no foreground group: on Linux the latter is 0 for a moment
    # between a job's end and the shell taking its terminal back.
    _, _, terminal, foreground = stat(shell_pid)
    if terminal != 0 or foreground != 0:
        return data, b""
    try:
        attributes = termios.tcgetattr(master)
    except termios.error:
        return data, b""
    lflag, cc = attributes[3], attributes[6]
    if not lflag & termios.ISIG:
        return data, b""  # raw mode (an editor): the program reads the keys itself
    keys = {cc[index][0]: signum for index, signum in SIGNAL_OF.items() if cc[index][0] in SIGNAL_KEYS}
    kept, echo = bytearray(), bytearray()
    for byte in data:
        signum = keys.get(byte)
        if signum is None:
            kept.append(byte)
            continue
        group = _newest_job(shell_pid, tag) if lflag & termios.ICANON else shell_pid
        with contextlib.suppress(OSError):
            os.killpg(group, signum)
        if lflag & termios.ECHO and lflag & termios.ECHOCTL:
            echo += b"^" + bytes([byte + 64])
    return bytes(kept), bytes(echo)


def _newest_job(shell_pid: int, tag: int) -> int:
    groups = {stat(pid)[0] for pid in spawn.tagged(tag) if stat(pid)[1] == shell_pid}
    groups.discard(-1)
    return max(groups - {shell_pid}, default=shell_pid)
