"""Starting the user's programs, and finding every process a program started, to end them.

The agent runs as root with four capabilities (SETUID, SETGID, KILL, CHOWN); everything it starts runs
as the user `sandbox`, who can therefore neither signal nor trace the agent. Each program gets a
supplementary group of its own, its tag: inherited through fork, exec, setsid and double forks, and
impossible to drop without CAP_SETGID, so even a daemon that left its session and cleared its
environment is found (/proc/<pid>/status, Groups) and killed with the rest of its program.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import signal
from collections.abc import Iterator
from typing import Any

USER = "sandbox"
WORKSPACE = "/workspace"
# Tags are gids no file or user has: far above any the image assigns.
FIRST_TAG, TAGS = 1_000_000, 1_000_000
# What only the agent may know: never handed to a program it starts.
PRIVATE_ENV = ("SANDBOX_AGENT_SECRET", "SANDBOX_AGENT_SECRET_SHA256")
SWEEP_ROUNDS = 100
# asyncio's buffer per pipe before it stops reading: the backpressure toward a program that floods.
READ_LIMIT = 64 * 1024
# The OOM killer's first choice is whatever the user runs, never the agent: its programs start with the
# highest score, the agent keeps the container's (0). A program may lower its own back to that floor,
# no further (the kernel's oom_score_adj_min), and then competes on size with a ~10 MiB agent.
CHILD_OOM_SCORE_ADJ = 1000
OOM_SCORE_ADJ = "/proc/self/oom_score_adj"

_account = pwd.getpwnam(USER)
UID, GID, HOME = _account.pw_uid, _account.pw_gid, _account.pw_dir
_tags: Iterator[int] = (FIRST_TAG + n % TAGS for n in itertools.count(os.getpid()))


def base_environment() -> dict[str, str]:
    """The environment of the user's programs: the image's and the sandbox's, as the user."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    env.update(HOME=HOME, USER=USER, LOGNAME=USER, SHELL="/bin/bash")
    return env


def new_tag() -> int:
    return next(_tags)


def _as_user(tag: int) -> dict[str, Any]:
    # subprocess sets the groups, then the gid, then the uid, in the child, before the exec.
    return {"user": UID, "group": GID, "extra_groups": [tag]}


class Child(asyncio.subprocess.Process):
    """asyncio's Process, which can also tell when the program itself ended: its wait() (in 3.11)
    returns only once every pipe closed too, which a detached child holding stdout delays forever."""

    def __init__(self, transport: Any, protocol: _Protocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(transport, protocol, loop)
        self.exited: asyncio.Future[None] = protocol.exited


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_LIMIT, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def spawn(
    argv: list[str],
    *,
    tag: int,
    env: dict[str, str],
    cwd: str = WORKSPACE,
    stdin: Any = asyncio.subprocess.PIPE,
    stdout: Any = asyncio.subprocess.PIPE,
    stderr: Any = asyncio.subprocess.PIPE,
    **kwargs: Any,
) -> Child:
    """Starts argv as the user, in a session of its own, with its tag. Raises OSError (no such
    program, no such folder) as the OS reports it."""
    loop = asyncio.get_running_loop()
    _children_oom_first(loop)
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(loop),
        argv[0],
        *argv[1:],
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        start_new_session=kwargs.pop("start_new_session", True),
        close_fds=True,
        **_as_user(tag),
        **kwargs,
    )
    return Child(transport, protocol, loop)


def _children_oom_first(loop: asyncio.AbstractEventLoop) -> None:
    """Raises the agent's own score for the fork the caller is about to make, and lowers it back at
    the loop's next turn: the child inherits it at fork, which happens inside subprocess_exec before
    its first suspension. For that moment the agent is as likely a victim as the user's programs,
    and then the larger loses, which is theirs but for a program smaller than the agent. (The child
    cannot do it itself: after setuid its /proc/self is root's until
    the exec, and the agent cannot write a uid-1000 process's file without CAP_DAC_OVERRIDE.)"""
    try:
        with open(OOM_SCORE_ADJ, "w") as adj:
            adj.write(str(CHILD_OOM_SCORE_ADJ))
    except OSError:
        return  # a kernel or runtime without it: the scores stay equal
    loop.call_soon(_restore_oom_score, _own_oom_score)


def _restore_oom_score(score: str) -> None:
    try:
        with open(OOM_SCORE_ADJ, "w") as adj:
            adj.write(score)
    except OSError:
        pass


def _read_oom_score() -> str:
    try:
        with open(OOM_SCORE_ADJ) as adj:
            return adj.read().strip()
    except OSError:
        return "0"


# What the container gave the agent (0 unless the engine set one): read once, at import.
_own_oom_score = _read_oom_score()


def tagged(tag: int) -> list[int]:
    """Every process that carries `tag`."""
    wanted = str(tag).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as status:
                for line in status:
                    # A zombie is dead already: killing it again changes nothing, and it stays
                    # listed until its parent (tini, or us) reaps it.
                    if line.startswith(b"State:") and b"Z" in line.split()[1]:
                        break
                    if line.startswith(b"Groups:"):
                        if wanted in line.split():
                            found.append(int(name))
                        break
        except OSError:
            continue  # it ended under us
    return found


def signal_tagged(tag: int, signum: int) -> int:
    """Sends signum to every process of the tag, once; how many there were."""
    pids = tagged(tag)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return len(pids)


def kill_tagged(tag: int) -> bool:
    """SIGKILLs the tag's processes until a scan finds none (children forked between a scan and its
    kill are caught by the next round); whether none is left."""
    return any(not signal_tagged(tag, signal.SIGKILL) for _ in range(SWEEP_ROUNDS))
