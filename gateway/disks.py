"""Each user's own filesystem: an ext4 image file of SANDBOX_DISK_MB, loop-mounted on the engine's
host, that holds the sandbox's /workspace and /home/sandbox. The kernel enforces its size: a sandbox
that fills it gets ENOSPC, and nobody else notices.

Under SANDBOX_DISK_DIR, one folder per deployment (GATEWAY_NAME):

    <dir>/<gateway>/images/<user>.ext4   the image, a sparse file
    <dir>/<gateway>/mounts/<user>/       its mount point; workspace/ and home/ exist only inside the
                                         mounted filesystem, never in the folder beneath it

That last point is the check that the engine sees our mount: the container's bind mounts name
<mount point>/workspace, so an engine that does not see the filesystem (a gateway in a container of
its own, without shared mount propagation) finds no such folder and refuses to create the container
(containers.py says so in words), instead of binding a folder on the host's disk without a bound.
Nothing cheaper tells: a gateway cannot know from inside whose mount namespace it shares.

Every call for a user runs under that user's lock (sandboxes.py): one user's disk is never set up,
mounted or removed twice at once, by this process or another on the same host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DiskFailed, DiskQuotaUnavailable, HostDiskLow
from .settings import DiskSettings, Settings

log = logging.getLogger(__name__)

# The image's user "sandbox" (sandbox-image/provision.sh).
SANDBOX_UID = 1000
# Written at the root of the filesystem (which the sandbox never sees) once it is set up: home
# seeded and an old workspace volume copied in. A start that died half-way does it again.
READY_MARK = ".sandbox-gateway-ready"
# noinit_itable: the kernel would otherwise zero the inode tables in the background, filling the
# sparse file with zeros it already reads back as zeros.
MOUNT_OPTIONS = "nosuid,nodev,noatime,noinit_itable"
# mkfs.ext4 on a sparse file: no blocks reserved for root (the sandbox is not root, and they would
# only shrink its quota), an inode per 8 KiB (node_modules is many small files; ext4's default of
# 16 KiB runs out of inodes first), and inode tables and journal left unwritten, so the file stays
# sparse (it reads back zeros, which is what lazy initialisation needs).
MKFS_OPTIONS = ("-q", "-F", "-m", "0", "-i", "8192", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard")
TOOL_TIMEOUT_S = 120.0
TOOLS = ("mkfs.ext4", "e2fsck", "resize2fs", "losetup", "mount", "umount", "cp")

HomeTemplate = Callable[[], Awaitable[tarfile.TarFile]]
OldWorkspace = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class DiskPaths:
    image: Path
    mountpoint: Path

    @property
    def workspace(self) -> Path:
        return self.mountpoint / "workspace"

    @property
    def home(self) -> Path:
        return self.mountpoint / "home"


def deployment_dir(directory: str, gateway_name: str) -> Path:
    return Path(directory) / gateway_name


def disk_paths(settings: Settings, user: str) -> DiskPaths:
    # User names are [A-Za-z0-9][A-Za-z0-9_.-]* (tokens.USER_PATTERN): never a path of their own.
    base = deployment_dir(settings.disk.directory, settings.gateway_name)
    return DiskPaths(image=base / "images" / f"{user}.ext4", mountpoint=base / "mounts" / user)


def host_problem(settings: Settings) -> str | None:
    """Why this process cannot give sandboxes their own filesystems, or None when it can."""
    if not settings.disk.quota:
        return None
    docker_host = settings.docker_host or "unix://"
    if not docker_host.startswith("unix://"):
        return f"the Docker engine is remote (DOCKER_HOST={docker_host}); disks are mounted on its host"
    if os.geteuid() != 0:
        return "the gateway does not run as root, which mounting a filesystem needs"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
    if not Path("/dev/loop-control").exists():
        return "this host has no loop devices (/dev/loop-control)"
    try:
        Path(settings.disk.directory).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create SANDBOX_DISK_DIR {settings.disk.directory}: {err.strerror}"
    return None


def free_mb(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize // (1024 * 1024)


def check_free_space(disk: DiskSettings, paths: list[str]) -> None:
    """Refuses a start while any of these filesystems (those that exist here) is below the floor."""
    if disk.min_free_mb == 0:
        return
    for path in paths:
        if not os.path.isdir(path):
            continue
        free = free_mb(path)
        if free < disk.min_free_mb:
            raise HostDiskLow(
                f"the host's disk holding {path} has {free} MiB free, below SANDBOX_MIN_FREE_DISK_MB"
                f" ({disk.min_free_mb}); no sandbox starts until space is freed"
            )


class Disks:
    """The lifecycle of each user's filesystem: created on first start, mounted while the sandbox
    exists, unmounted when it is removed, deleted on purge."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.problem = host_problem(settings)
        if self.problem:
            log.warning(
                "sandboxes cannot start: %s (SANDBOX_DISK_MB=0 turns quotas off, unsafely)", self.problem
            )

    async def attach(self, user: str, home_template: HomeTemplate, old_workspace: OldWorkspace) -> None:
        """Makes the user's filesystem ready and mounted (creating it on first use); a no-op without
        quotas. `home_template` gives the image's home folder, `old_workspace` the folder of a
        workspace volume from before quotas; each is asked only while the filesystem is new."""
        if not self._settings.disk.quota:
            return
        if self.problem:
            raise DiskQuotaUnavailable(
                f"the gateway cannot enforce disk quotas: {self.problem}. Run it as root on the engine's"
                " host, or set SANDBOX_DISK_MB=0 (no quota, unsafe)"
            )
        paths = disk_paths(self._settings, user)
        try:
            if not await asyncio.to_thread(os.path.ismount, paths.mountpoint):
                await self._prepare_image(paths)
                await self._mount(paths)
            if not await asyncio.to_thread((paths.mountpoint / READY_MARK).exists):
                await self._initialise(paths, home_template, old_workspace)
        except BaseException:
            await self.detach(user)
            raise

    async def detach(self, user: str) -> None:
        """Unmounts the user's filesystem, if it is mounted; after the container is gone."""
        if not self._settings.disk.quota:
            return
        await unmount(disk_paths(self._settings, user).mountpoint)

    async def remove(self, user: str) -> bool:
        """Deletes the user's filesystem for good (purge); whether there was one. Also with quotas
        turned off since: purge deletes whatever the user had."""
        paths = disk_paths(self._settings, user)
        await unmount(paths.mountpoint)
        existed = await asyncio.to_thread(paths.image.exists)
        await asyncio.to_thread(paths.image.unlink, missing_ok=True)
        if await asyncio.to_thread(paths.mountpoint.is_dir):
            await asyncio.to_thread(paths.mountpoint.rmdir)
        return existed

    async def mounted_users(self) -> list[str]:
        """Users whose filesystem is mounted now, by this process or another on the host."""
        if not self._settings.disk.quota:
            return []
        mounts = deployment_dir(self._settings.disk.directory, self._settings.gateway_name) / "mounts"
        return await asyncio.to_thread(_mounted_under, mounts)

    def check_free_space(self, docker_root: str | None) -> None:
        paths = [self._settings.disk.directory] if self._settings.disk.quota else []
        check_free_space(self._settings.disk, [*paths, *([docker_root] if docker_root else [])])

    async def _prepare_image(self, paths: DiskPaths) -> None:
        size = self._settings.disk.size_mb * 1024 * 1024
        await asyncio.to_thread(paths.image.parent.mkdir, parents=True, exist_ok=True)
        if not await asyncio.to_thread(paths.image.exists):
            # Made under another name and renamed once complete: a crash during mkfs leaves no image
            # that looks ready.
            fresh = paths.image.with_suffix(".new")
            try:
                await asyncio.to_thread(_sparse_file, fresh, size)
                await run_tool("mkfs.ext4", *MKFS_OPTIONS, str(fresh))
                await asyncio.to_thread(fresh.rename, paths.image)
            finally:
                await asyncio.to_thread(fresh.unlink, missing_ok=True)
            log.info("created a %d MiB filesystem for %s", self._settings.disk.size_mb, paths.image.stem)
        elif (await asyncio.to_thread(paths.image.stat)).st_size < size:
            # SANDBOX_DISK_MB grew since: the filesystem grows with it. It never shrinks (resize2fs
            # would have to move the user's files, and could fail for want of room).
            await asyncio.to_thread(os.truncate, paths.image, size)
            # resize2fs insists on a freshly checked filesystem; 1 means "errors corrected".
            await run_tool("e2fsck", "-f", "-p", str(paths.image), ok_codes=(0, 1))
            await run_tool("resize2fs", str(paths.image))
            log.info("grew the filesystem of %s to %d MiB", paths.image.stem, self._settings.disk.size_mb)

    async def _mount(self, paths: DiskPaths) -> None:
        await asyncio.to_thread(paths.mountpoint.mkdir, parents=True, exist_ok=True)
        # Something in the folder beneath would show through to the engine if our mount does not
        # reach it (the module's docstring): refuse rather than hand out an unbounded folder.
        if await asyncio.to_thread(_has_entries, paths.mountpoint):
            raise DiskFailed(f"{paths.mountpoint} is not empty while unmounted; move its contents away")
        # losetup rather than `mount -o loop`, for direct I/O: the loop device then writes to the image
        # without a second copy in the page cache, and an fsync inside costs what it costs outside
        # (256 MiB with conv=fsync: 0.2 s, against 1.5-2 s through the cache).
        device = (await run_tool("losetup", "--find", "--show", "--direct-io=on", str(paths.image))).strip()
        try:
            await run_tool("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, str(paths.mountpoint))
        finally:
            # On a mounted device this only marks it to go with the unmount (autoclear), as
            # `mount -o loop` does; on one that failed to mount it detaches it now.
            await run_tool("losetup", "--detach", device)

    async def _initialise(
        self, paths: DiskPaths, home_template: HomeTemplate, old_workspace: OldWorkspace
    ) -> None:
        for folder in (paths.workspace, paths.home):
            await asyncio.to_thread(_sandbox_folder, folder)
        if not await asyncio.to_thread(_has_entries, paths.home):
            # The dotfiles useradd put in the image's home (.bashrc, .profile), so that login shells
            # behave as they did when home lived in the container.
            template = await home_template()
            await asyncio.to_thread(_extract_home, template, paths.home)
        old = await old_workspace()
        if old is not None:
            # A workspace volume from before quotas: its files move in, and the volume stays until purge.
            log.info("copying the workspace volume of %s into its new filesystem", paths.image.stem)
            try:
                await run_tool("cp", "-a", "--", f"{old}/.", f"{paths.workspace}/")
            except DiskFailed as err:
                raise DiskFailed(
                    f"the old workspace does not fit in SANDBOX_DISK_MB ({self._settings.disk.size_mb} MiB)"
                    f" or could not be copied: {err.message}"
                ) from err
        await asyncio.to_thread((paths.mountpoint / READY_MARK).touch)


async def unmount(mountpoint: Path) -> None:
    if not await asyncio.to_thread(os.path.ismount, mountpoint):
        return
    try:
        await run_tool("umount", str(mountpoint))
    except DiskFailed as err:
        # Still busy: something outside the sandbox holds a file open (an operator's shell, a
        # backup). Detach it now; the kernel lets go of the filesystem when the last user does.
        log.warning("unmounting %s lazily: %s", mountpoint, err.message)
        await run_tool("umount", "--lazy", str(mountpoint))


async def remove_deployment_disks(directory: str, gateway_name: str) -> None:
    """Unmounts and deletes every filesystem of a deployment (tests, benchmarks, an uninstall)."""
    base = deployment_dir(directory, gateway_name)
    for user in await asyncio.to_thread(_mounted_under, base / "mounts"):
        await unmount(base / "mounts" / user)
    if await asyncio.to_thread(_mounted_under, base / "mounts"):
        raise DiskFailed(f"filesystems under {base} are still mounted; not deleting it")
    await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)


async def run_tool(*argv: str, ok_codes: tuple[int, ...] = (0,)) -> str:
    """Runs a system tool by argv (never through a shell) and returns what it printed; DiskFailed
    with its words when it fails."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(TOOL_TIMEOUT_S):
            output, errors = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode not in ok_codes:
        words = (errors or output).decode(errors="replace").strip()[-500:]
        raise DiskFailed(f"{argv[0]} failed (exit {process.returncode}): {words}")
    return output.decode(errors="replace")


def _sparse_file(path: Path, size: int) -> None:
    with path.open("wb") as file:
        file.truncate(size)


def _has_entries(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(True for _ in entries)


def _mounted_under(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if os.path.ismount(entry))


def _sandbox_folder(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    os.chown(folder, SANDBOX_UID, SANDBOX_UID)
    folder.chmod(0o755)


def _extract_home(template: tarfile.TarFile, home: Path) -> None:
    """Writes the regular files and folders of the image's home (an archive of /home/sandbox, whose
    entries start with "sandbox/") into `home`, owned by the sandbox user."""
    for member in template.getmembers():
        parts = PurePosixPath(member.name).parts[1:]
        if not parts or ".." in parts or not (member.isfile() or member.isdir()):
            continue
        target = home.joinpath(*parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            source = template.extractfile(member)
            assert source is not None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
        os.chown(target, SANDBOX_UID, SANDBOX_UID)
        target.chmod(member.mode & 0o777)
