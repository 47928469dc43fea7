"""Writing a checkpoint folder safely: an exclusive claim on the target, staging beside it, checksums, the final move
into place, and recovery from a save that was killed.

A save to ``path`` works like this (every name is beside ``path``, in its parent folder):

1. **claim**: ``.NAME.qadapt-lock`` is opened and locked with ``flock``. The kernel drops the lock when its process
   dies, so a lock that can be taken is never a live save's: a concurrent save to the same path is refused
   (:class:`CheckpointError`) and a killed one never blocks the next.
2. **recover** (still holding the claim): what a killed save left is undone. The lock file doubles as the journal of
   an overwrite in progress: if it names a backup, the old folder is put back where it was (or, when the new one was
   already in place, the backup is removed). Staging folders of this path holding qadapt's marker file
   (``.qadapt-staging``, naming the target) are removed: with the claim held, no live save owns them. Nothing
   without the marker is touched.
3. **stage**: the checkpoint is written into a fresh ``.NAME.XXXX.partial`` folder.
4. **commit**: to a free path (absent, or an empty folder) with one ``rename``, which fails rather than replaces if
   anything appeared there; to an occupied path (``overwrite=True``) the journal names this save's backup
   ``.NAME.XXXX.qadapt-old`` and is synced, the old entry (folder, file or symlink, never followed) is renamed to the
   backup, the staging folder to ``path``, and the backup is removed. The marker goes last, from inside ``path``.
5. **release**: the lock file is removed (after checking it is still the one locked) and closed.

Every ``OSError`` (disk full, a read-only folder) becomes a :class:`CheckpointError`, with the staging folder removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile

from ..errors import CheckpointError

try:  # POSIX; qadapt's backends run on Linux (bitsandbytes, gptqmodel and hqq have no other CPU builds to speak of)
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves still stage and rename, without the cross-process claim
    fcntl = None

#: the file inside a staging folder that proves it is qadapt's (and names the save's target)
STAGING_MARKER = ".qadapt-staging"
LOCK_SUFFIX = ".qadapt-lock"
BACKUP_SUFFIX = ".qadapt-old"
STAGING_SUFFIX = ".partial"


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def sha256(path: str, size: int | None = None) -> str:
    """The file's SHA-256; with ``size``, read at most ``size + 1`` bytes (a file that grows while it is read cannot
    make the read endless)."""
    digest = hashlib.sha256()
    left = None if size is None else size + 1
    with open(path, "rb") as handle:
        while left is None or left > 0:
            block = handle.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


def checksums(root: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (the staging marker excepted), POSIX separators."""
    return {name: sha256(os.path.join(root, name)) for name in _files(root)}


def sizes(root: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of the same files as :func:`checksums`."""
    return {name: os.lstat(os.path.join(root, name)).st_size for name in _files(root)}


def _files(root: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if relative != STAGING_MARKER:
                found.append(relative)
    return sorted(found)


def is_free(path: str) -> bool:
    """Nothing at ``path``, or an empty real folder (a symlink or a file is never free, even a dangling link)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    return stat.S_ISDIR(info.st_mode) and not os.listdir(path)


def remove_entry(path: str) -> None:
    """Remove what is at ``path`` without following it: a folder's tree, or a file or symlink itself."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class SaveTarget:
    """The claim on one save's target path, held for the duration of a ``with`` block (see the module docstring)."""

    def __init__(self, path: str, asked: str) -> None:
        self.path = os.path.abspath(path)
        self.asked = asked
        self.parent, self.name = os.path.split(self.path)
        self.lock_path = os.path.join(self.parent, f".{self.name}{LOCK_SUFFIX}")
        self._lock = None
        self._stagings: list[str] = []

    # ------------------------------------------------------------------ the claim
    def __enter__(self) -> "SaveTarget":
        try:
            os.makedirs(self.parent, exist_ok=True)
            self._lock = _claim(self.lock_path)
        except OSError as exc:
            raise self._error(exc) from exc
        if self._lock is None:
            raise CheckpointError(self.asked, "another save to this path is in progress (it holds "
                                  f"{os.path.basename(self.lock_path)})", "Wait for it to finish, or save elsewhere")
        try:
            recover(self)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind, value, trace) -> None:
        try:
            for staging in self._stagings:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            self._release()
        error = _as_os_error(value)
        if error is not None:
            raise self._error(error) from value

    def _release(self) -> None:
        if self._lock is None:
            return
        try:
            if _same_file(self._lock, self.lock_path):
                os.unlink(self.lock_path)
        except OSError:
            pass  # a lock file that stays behind is harmless: the next save takes it over
        finally:
            os.close(self._lock)
            self._lock = None

    def _error(self, exc: OSError) -> CheckpointError:
        reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the folder is on a read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "a file is larger than allowed here"}
        why = reason.get(exc.errno, type(exc).__name__)
        return CheckpointError(self.asked, f"writing failed ({why}: {exc.strerror or exc}); nothing was left at or "
                               "beside the path",
                               "Free some space or choose a writable folder, then save again")

    # ------------------------------------------------------------------ staging and commit
    def staging(self) -> str:
        """A new, empty staging folder beside the target, marked as this save's."""
        folder = tempfile.mkdtemp(prefix=f".{self.name}.", suffix=STAGING_SUFFIX, dir=self.parent)
        self._stagings.append(folder)
        write_json(os.path.join(folder, STAGING_MARKER), {"target": self.path, "pid": os.getpid()})
        return folder

    def commit(self, staging: str, overwrite: bool) -> None:
        """Move ``staging`` into place (see the module docstring, step 4)."""
        if is_free(self.path):
            try:
                # rename(2) onto an absent path or an empty folder; it fails, never replaces, if anything is there now
                os.rename(staging, self.path)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise
                raise self._raced() from exc
        elif not overwrite:
            raise self._raced()
        else:
            # this save's own backup, beside the path: never an older one's, never inside the folder being moved
            backup = os.path.join(self.parent, f".{self.name}.{os.urandom(6).hex()}{BACKUP_SUFFIX}")
            self._journal({"replacing": os.path.basename(backup)})
            os.rename(self.path, backup)
            os.rename(staging, self.path)
            remove_entry(backup)
            self._journal({})
        if staging in self._stagings:
            self._stagings.remove(staging)
        # the marker kept the staging folder provably qadapt's up to the rename; a kill before this line leaves it
        # inside the checkpoint, where the next save or load under the claim removes it (recover)
        _remove_marker(self.path, self.path)

    def _raced(self) -> CheckpointError:
        return CheckpointError(self.asked, "something else was written to the path while saving (nothing of it was "
                               "replaced)", "Choose a new folder, or pass overwrite=True")

    def _journal(self, state: dict) -> None:
        data = json.dumps(state).encode()
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, data, 0)
        os.fsync(self._lock)


def move_into_place(folder: str, path: str, *, overwrite: bool, asked: str) -> None:
    """Move the finished ``folder`` to ``path`` as a save does (claimed, recoverable, never replacing a non-empty
    ``path`` unless ``overwrite``): for writers other than :func:`qadapt.save` (``qadapt export``)."""
    with SaveTarget(path, asked) as target:
        if not is_free(target.path) and not overwrite:
            raise CheckpointError(asked, "the path exists and is not empty; qadapt does not overwrite files unasked",
                                  "Choose a new folder, or pass overwrite")
        target.commit(folder, overwrite)


def _as_os_error(exc) -> OSError | None:
    """``exc`` as the OSError it is or wraps: safetensors' Rust writer (0.8) reports a full disk as a
    ``SafetensorError`` "Error while serializing: I/O error: File too large (os error 27)", not as an OSError."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
        found = re.search(r"os error (\d+)", str(exc))
        return OSError(int(found.group(1)) if found else errno.EIO, str(exc))
    return None


def _claim(lock_path: str):
    """An open descriptor of ``lock_path`` holding its exclusive ``flock``; None if another live process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        if fcntl is None:  # pragma: no cover
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, lock_path):
            return fd
        # the holder removed the file between our open and our lock: ours is an orphan inode; take the new one
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, there = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _read_journal(fd: int) -> dict:
    data = os.pread(fd, 1 << 16, 0)
    try:
        state = json.loads(data.decode()) if data.strip() else {}
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def recover(target: SaveTarget) -> None:
    """Undo what a killed save to ``target`` left (the claim is held: no live save owns any of it)."""
    state = _read_journal(target._lock)
    backup = state.get("replacing")
    if isinstance(backup, str) and backup == os.path.basename(backup) and backup.startswith(f".{target.name}.") \
            and backup.endswith(BACKUP_SUFFIX):
        backup = os.path.join(target.parent, backup)
        if os.path.lexists(backup):
            if os.path.lexists(target.path):
                remove_entry(backup)  # the new folder was in place: only the old one's removal was cut short
            else:
                os.rename(backup, target.path)  # killed between the two renames: the old folder goes back
    if state:
        target._journal({})
    for staging in stale_stagings(target.parent, target.path):
        shutil.rmtree(staging, ignore_errors=True)
    _remove_marker(target.path, target.path)


def _remove_marker(folder: str, target: str) -> None:
    """Remove qadapt's staging marker from ``folder`` if it is there and names ``target``."""
    marker = os.path.join(folder, STAGING_MARKER)
    try:
        with open(marker) as handle:
            names = json.load(handle).get("target")
    except (OSError, ValueError, AttributeError):
        return
    if names == target and not os.path.islink(marker):
        os.unlink(marker)


def stale_stagings(parent: str, path: str) -> list[str]:
    """Staging folders in ``parent`` that qadapt made for a save to ``path`` (they hold its marker naming ``path``)."""
    prefix = f".{os.path.basename(path)}."
    found = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for name in names:
        folder = os.path.join(parent, name)
        if not (name.startswith(prefix) and name.endswith(STAGING_SUFFIX)) or os.path.islink(folder):
            continue
        try:
            with open(os.path.join(folder, STAGING_MARKER)) as handle:
                marker = json.load(handle)
        except (OSError, ValueError):
            continue  # not provably qadapt's: left alone
        if isinstance(marker, dict) and marker.get("target") == path:
            found.append(folder)
    return found


def recover_for_load(path: str) -> None:
    """Before loading ``path``: if a killed overwrite left the old folder only as its backup, put it back. Does
    nothing while a live save holds the claim, or where there is nothing to recover."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not os.path.lexists(os.path.join(parent, f".{name}{LOCK_SUFFIX}")):
        return
    target = SaveTarget(path, f"load {path!r}")
    try:
        lock = _claim(target.lock_path)
    except OSError:
        return  # cannot write here: nothing to recover with
    if lock is None:
        return
    target._lock = lock
    try:
        recover(target)
    except OSError:
        pass  # the load itself then says what is missing
    finally:
        target._release()
