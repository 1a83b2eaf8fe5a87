"""Writing outputs where the user asks, whole or not at all.

Conventions:
- a path a command will write is checked before any work starts
  (`check_output_file`, `check_output_folder`): an empty name, a folder
  where a file is wanted (or a file where a folder is), a parent that is a
  file, a name the system cannot use, or a folder that cannot be written is
  one error line (flopsim.errors.InputError, exit 2);
- a file is written to a temporary sibling, then renamed over the target
  (`write_atomic`); a folder likewise (flopsim.report). Temporary siblings
  are named `.<name>.flopsim-<pid>-<random>.tmp` (or `.old`), so a run that
  was killed leaves a name a later run recognises: `remove_stale` deletes
  the siblings of a target whose process no longer runs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from flopsim.errors import bad_value

STALE = re.compile(r"^\.(?P<name>.+)\.flopsim-(?P<pid>\d+)-[^.]*\.(tmp|old)$")


def temp_prefix(target: Path) -> str:
    """The prefix of a temporary sibling of `target` made by this process."""
    return f".{target.name}.flopsim-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def remove_stale(target: Path) -> None:
    """Delete temporary siblings of `target` left by flopsim runs that no longer run."""
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = STALE.match(sibling.name)
        if not match or match["name"] != target.name or _running(int(match["pid"])):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            try:
                sibling.unlink()
            except OSError:
                pass


def _nearest_existing(path: Path, option: str, value) -> Path:
    """The closest ancestor of `path` that exists; an error if it is not a writable folder."""
    probe = path.parent
    try:
        while not probe.exists():
            probe = probe.parent
    except OSError as err:
        raise bad_value(option, value, f"cannot be used ({err.strerror or type(err).__name__})") from None
    if not probe.is_dir():
        raise bad_value(option, value, f"{probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise bad_value(option, value, f"folder {probe} cannot be written")
    return probe


def check_output_file(path, option: str) -> Path:
    """`path` as a file this command may write (see the module docstring)."""
    return _check_output(path, option, "file")


def check_output_folder(path, option: str) -> Path:
    """`path` as a folder this command may create or replace (see the module docstring)."""
    return _check_output(path, option, "folder")


def _check_output(path, option: str, what: str) -> Path:
    if path is None or str(path).strip() == "":
        raise bad_value(option, "" if path is None else str(path), f"expected a {what} name")
    path = Path(path)
    try:
        if what == "file" and path.is_dir():
            raise bad_value(option, str(path), "is a folder; give a file name")
        if what == "folder" and path.exists() and not path.is_dir():
            raise bad_value(option, str(path), "exists and is not a folder")
    except OSError as err:
        raise bad_value(option, str(path)[:120], f"cannot be used ({err.strerror or type(err).__name__})") from None
    _nearest_existing(path, option, str(path))
    return path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a whole file or nothing: a temporary sibling, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
