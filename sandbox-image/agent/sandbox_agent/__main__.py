"""python3 -IS -m sandbox_agent: the agent, as tini's only child (sandbox-image/bin/sandbox-agent)."""

from __future__ import annotations

import sys

# asyncio imports ssl if it can, which costs this small resident process a fifth of its memory and
# a third of its start; the agent speaks no TLS.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
# The same for hashlib's OpenSSL backend: its builtin sha256 is all the secret's check needs.
sys.modules.setdefault("_hashlib", None)  # type: ignore[arg-type]

import asyncio  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from functools import partial  # noqa: E402

from . import files, files_watch, ports, processes, relay, runs, server, terminals  # noqa: E402

# The sandbox's terminals and processes: the agent's state, which lives as long as it does.
TERMINALS = terminals.Terminals()

PROCESSES = processes.Registry()
FILE_WORKERS = files.Workers()
ARCHIVES = files.Archives()
WATCHES = files_watch.Watches()
OPERATIONS: dict[str, server.Handler] = {
    "run": runs.run,
    "connect": relay.connect,
    "ports": ports.ports,
    "terminal.open": TERMINALS.open,
    "terminal.attach": TERMINALS.attach,
    "terminal.list": TERMINALS.list,
    "terminal.close": TERMINALS.close,
    "ping": lambda connection, _: connection.send_json({"ok": True}),
    "process.start": partial(processes.start, PROCESSES),
    "process.list": partial(processes.list_processes, PROCESSES),
    "process.get": partial(processes.get, PROCESSES),
    "process.attach": partial(processes.attach, PROCESSES),
    "process.input": partial(processes.input_, PROCESSES),
    "process.signal": partial(processes.signal, PROCESSES),
    "files.stat": partial(files.short, FILE_WORKERS, "stat"),
    "files.mkdir": partial(files.short, FILE_WORKERS, "mkdir"),
    "files.move": partial(files.short, FILE_WORKERS, "move"),
    "files.delete": partial(files.short, FILE_WORKERS, "delete"),
    "files.list": partial(files.list_folder, FILE_WORKERS),
    "files.read": partial(files.read, FILE_WORKERS),
    "files.write": partial(files.write, FILE_WORKERS),
    "files.archive": ARCHIVES.archive,
    "files.watch": WATCHES.watch,
}


def _child_watcher() -> None:
    """One pidfd per child where the kernel has them; a thread per child, asyncio's default, else."""
    try:
        watcher: asyncio.AbstractChildWatcher = asyncio.PidfdChildWatcher()
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    with_loop = asyncio.get_running_loop()
    watcher.attach_loop(with_loop)
    asyncio.set_child_watcher(watcher)


async def _main() -> None:
    # The digest of the secret (containers.py says why not the secret itself); a bare secret, from a
    # container made by hand, is hashed here.
    digest = os.environ.pop("SANDBOX_AGENT_SECRET_SHA256", "")
    if secret := os.environ.pop("SANDBOX_AGENT_SECRET", ""):
        digest = digest or server.digest_of(secret.encode())
    if not digest:
        raise SystemExit("sandbox-agent: SANDBOX_AGENT_SECRET_SHA256 is not set")
    agent = server.AgentServer(digest, OPERATIONS)
    await agent.start()
    _child_watcher()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = asyncio.ensure_future(agent.serve_forever())
    await stop.wait()
    serving.cancel()
    await PROCESSES.stop_all()
    await TERMINALS.end_all()
    FILE_WORKERS.end_all()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="sandbox-agent %(levelname)s %(message)s")
    asyncio.run(_main())


if __name__ == "__main__":
    main()
