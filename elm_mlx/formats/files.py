"""Atomic outputs: every directory and file elm_mlx writes appears complete or not at all.

A directory is written into a temporary sibling `.NAME.partial-PID-XXXX` and renamed
into place when complete (`atomic_dir`); a single file goes through a temporary sibling
and `os.replace` (`atomic_path`, `write_text`, `write_json`). Outputs get
the permissions the user's umask gives, as any file the user makes.

The temporary name carries the owning process id, and an `.owner` file inside a
partial directory records it with the process start time and host, so a later run can
tell a leftover of a killed process from the work of a live one: `clean_stale_partials`
removes the leftovers, and `atomic_dir` and `atomic_path` call it before they start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER_FILE = ".owner"
Log = Callable[[str], None]


class OutputExistsError(FileExistsError):
    """An existing output: `replaceable` when passing `force` would replace it."""

    def __init__(self, message: str, *, replaceable: bool = False) -> None:
        super().__init__(message)
        self.replaceable = replaceable


# ---- permissions ------------------------------------------------------------------


def umask() -> int:
    """The process umask, read without changing it where the system allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path: Path, *, directory: bool = False) -> None:
    """Give `path` the permissions the umask gives a new file or directory."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def user_modes(root: Path) -> None:
    """`user_mode` for `root` and everything under it (links left alone): MLX creates its
    files 0644 whatever the umask."""
    for parent, _, names in os.walk(root):
        user_mode(Path(parent), directory=True)
        for name in names:
            if not (Path(parent) / name).is_symlink():
                user_mode(Path(parent) / name)


# ---- owners -----------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot on Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:  # a killed process its parent has not reaped yet (a zombie) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_gone(partial: Path, suffix: str) -> bool:
    """True when the process that made `partial` (`suffix`: PID-XXXX after `.partial-`) has
    ended, or its id now names another process."""
    try:
        pid = int(suffix.split("-", 1)[0])
    except ValueError:
        return False  # not a name we make
    owner = {}
    if partial.is_dir():
        try:
            owner = json.loads((partial / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = {}
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return False  # another machine's process, on a shared file system
    if not _alive(pid):
        return True
    started = owner.get("start")
    return started is not None and started != _start_time(pid)


def _partial_name(name: str) -> str:
    return f".{name}.partial-{os.getpid()}-"


# ---- cleaning ---------------------------------------------------------------------


def clean_stale_partials(parent: str | Path, name: str) -> list[Path]:
    """Remove `.NAME.partial-*` leftovers in `parent` whose owning process is gone.

    Returns what was removed. The work of live processes is left alone."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    prefix = f".{name}.partial-"
    for leftover in sorted(parent.glob(prefix + "*")):
        suffix = leftover.name[len(prefix) :]
        if not _owner_gone(leftover, suffix):
            continue
        previous = leftover / name
        if "-old-" in suffix and previous.is_dir() and not (parent / name).exists():
            # killed between the two renames of a replacement: the previous output goes back
            previous.rename(parent / name)
        try:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except FileNotFoundError:
            continue  # another run cleaned it first
        removed.append(leftover)
    return removed


def stale_message(removed: list[Path]) -> str:
    """The one line that says what `clean_stale_partials` removed."""
    names = ", ".join(p.name for p in removed)
    return f"removed {len(removed)} unfinished output(s) left by a stopped process: {names}"


def _clean(path: Path, log: Log | None) -> None:
    removed = clean_stale_partials(path.parent, path.name)
    if removed and log:
        log(stale_message(removed))


# ---- directories ------------------------------------------------------------------


def check_target(
    path: str | Path, *, force: bool, marker: str | None = None, kind: str = "an output"
) -> None:
    """Refuse an existing `path` unless `force`; never replace a file, a link, or (with
    `marker`) a non-empty directory without the `marker` file that shows it is `kind`."""
    path = Path(path)
    in_the_way = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise NotADirectoryError(f"{in_the_way} is a file, not a directory")
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise OutputExistsError(f"{path} exists and is not a directory; refusing to replace it")
    if not force:
        raise OutputExistsError(f"{path} already exists", replaceable=True)
    if marker and any(path.iterdir()) and not (path / marker).is_file():
        raise OutputExistsError(f"{path} is not {kind} (no {marker}); refusing to replace it")


@contextmanager
def atomic_dir(
    path: str | Path,
    *,
    force: bool = False,
    marker: str | None = None,
    kind: str = "an output",
    log: Log | None = None,
) -> Iterator[Path]:
    """A temporary sibling of `path` to write into, renamed to `path` when the block ends.

    An existing `path` is refused unless `force` (see `check_target`), and then replaced
    only once the new one is complete. It and everything in it get the permissions the
    umask gives (`user_modes`). On any exception (Ctrl-C included) the temporary
    directory is removed. Leftovers of killed runs are removed first (`log` says so)."""
    path = Path(path).absolute()
    check_target(path, force=force, marker=marker, kind=kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean(path, log)
        tmp = Path(tempfile.mkdtemp(prefix=_partial_name(path.name), dir=path.parent))
    except OSError as e:
        raise _naming(e, path) from None
    try:
        owner = {"pid": os.getpid(), "start": _start_time(os.getpid())}
        (tmp / OWNER_FILE).write_text(json.dumps({**owner, "host": socket.gethostname()}))
        yield tmp
        (tmp / OWNER_FILE).unlink()
        user_modes(tmp)
        check_target(path, force=force, marker=marker, kind=kind)  # it may have appeared meanwhile
        _swap_in(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming(e, path, tmp) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _naming(e: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """`e` naming the output the user asked for: `path` when it names no file, and the
    file's final place instead of its place in the temporary directory `tmp`. numpy's short
    write (`ndarray.tofile`: "N requested and M written", no errno) on a file system with
    less than N bytes free is the full disk it is."""
    if e.errno is None and _SHORT_WRITE.fullmatch(str(e)):
        requested = int(str(e).split()[0])
        try:
            full = shutil.disk_usage(path.parent).free < requested
        except OSError:
            full = False
        if full:
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if e.errno is None or isinstance(e, FileExistsError):
        return e
    name = os.fsdecode(e.filename) if e.filename is not None else None
    if name is None:
        name = str(path)
    elif tmp is not None and Path(name).is_relative_to(tmp):
        name = str(path / Path(name).relative_to(tmp))
    elif tmp is None and Path(name).parent == path.parent:
        name = str(path)  # the temporary sibling the user never asked for
    return type(e)(e.errno, e.strerror, name)


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`, replacing an existing directory only after the rename."""
    if not path.exists():
        tmp.rename(path)
        return
    old = Path(tempfile.mkdtemp(prefix=_partial_name(path.name) + "old-", dir=path.parent))
    path.rename(old / path.name)
    try:
        tmp.rename(path)
    except BaseException:
        (old / path.name).rename(path)  # the previous output comes back
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- single files -----------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path, *, log: Log | None = None) -> Iterator[Path]:
    """A temporary sibling path (same suffix) to write `path` through; it replaces `path`
    when the block ends and is removed on any exception. Leftovers of killed runs that
    wrote `path` are removed first (`log` says so)."""
    path = Path(path)
    _clean(path, log)
    prefix = _partial_name(path.name)
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        user_mode(tmp, directory=False)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _naming(e, path, tmp) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, content) -> Path:
    """`content` as indented JSON with a final newline (config-style files)."""
    return write_text(path, json.dumps(content, indent=2) + "\n")
