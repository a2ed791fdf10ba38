"""Reading and writing files that nobody vouched for: the one way every step opens its input
and publishes its output.

Reading (:func:`read_regular`): a path found in an input folder may be anything: a regular
file, a symbolic link (to a file in the folder, or to ``/etc/passwd``), a FIFO (opening it
blocks for ever), a socket, a device, a directory named ``x.dcm``, a file that vanished or was
swapped between the listing and the read. Only a regular file is read, never through a link
unless asked (and then only a link that stays inside the folder the command was given), never
more than ``max_bytes``; anything else raises :class:`RefusedError` with a reason code and a
sentence, which the step reports for that entry and goes on.

Writing (:func:`publish`): the bytes go to a temporary file created exclusively (``O_EXCL |
O_NOFOLLOW``: a planted link or file at that name is an error, not a target) in the output
folder, and are renamed into place. A rename replaces a link at the final name instead of
writing through it, and a crash never leaves half a file under a final name. The folder itself
must lie inside the output root the command was given.

Text (:func:`printable`): control characters in file names and DICOM values are escaped before
they reach a terminal table (a name holding a newline and escape sequences once forged a report
row); ``--json`` keeps them intact.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

#: The default ceiling for one input file (DICOM enhanced multi-frame objects reach a few GB).
MAX_FILE_BYTES = 4 << 30


class RefusedError(Exception):
    """An input entry that is not read, with the reason code the reports show."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def printable_path(path: str | os.PathLike[str] | bytes) -> str:
    """The path as text that any database and terminal accepts (undecodable bytes escaped):
    paths as the index stores them."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def hash_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (hashlib releases the GIL on large updates)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def create_owner_only(path: Path, data: bytes = b"") -> None:
    """Create ``path`` here and now, readable by its owner only, holding ``data``: an existing
    file or link at that name is an error (``FileExistsError``), never overwritten or followed.
    For identified copies (backups of the index and keys), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def printable(text: str | os.PathLike[str] | bytes) -> str:
    """``text`` safe for one line of a terminal: undecodable bytes, control characters (C0,
    DEL, C1) and line or paragraph separators escaped as ``\\xNN`` / ``\\uNNNN``."""
    if isinstance(text, bytes | os.PathLike):
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in (0x2028, 0x2029, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069):
            out.append(f"\\u{code:04x}")  # line breaks and bidirectional overrides
        else:
            out.append(ch)
    return "".join(out)


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (resolved, links followed) lies in ``root`` (resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def check_entry(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, follow: bool = False
) -> tuple[str, os.stat_result]:
    """The path to open for ``path`` and its ``lstat``, or :class:`RefusedError`.

    A symbolic link is refused (``symlink``, with its target) unless ``follow`` and its target
    lies inside ``root`` (anywhere when ``root`` is None: a path the user named himself); then
    the target is checked in its place.
    """
    name = os.fspath(path)
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        raise RefusedError("missing", "vanished before it was read") from None
    except OSError as exc:
        raise RefusedError("stat_failed", f"cannot stat: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(name)
        inside = root is None or is_inside(target, root)
        if not (follow and inside):
            where = "" if root is None else f" ({'inside' if inside else 'outside'} the input)"
            raise RefusedError(
                "symlink", f"a symbolic link to {printable(target)}{where}; not followed"
            )
        name = target
        try:
            st = os.lstat(name)
        except OSError:
            raise RefusedError("missing", "a symbolic link to nothing") from None
    if stat.S_ISDIR(st.st_mode):
        raise RefusedError("is_directory", "a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise RefusedError("not_regular_file", f"{_kind(st.st_mode)}, not a regular file; not read")
    return name, st


def read_regular(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    follow: bool = False,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and its ``stat``, or :class:`RefusedError` (see the module)."""
    name, st = check_entry(path, root, follow)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except FileNotFoundError:
        raise RefusedError("missing", "vanished before it was read") from None
    except PermissionError:
        raise RefusedError("permission_denied", "permission denied when reading") from None
    except OSError as exc:
        if exc.errno == getattr(os, "ELOOP", 40):
            raise RefusedError("symlink", "became a symbolic link; not followed") from None
        raise RefusedError("io_error", f"cannot open: {exc.strerror or exc}") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise RefusedError("not_regular_file", f"{_kind(opened.st_mode)} when opened")
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise RefusedError("changed", "replaced by another file while read")
        if opened.st_size > max_bytes:
            raise RefusedError(
                "too_large", f"{opened.st_size} bytes, over the limit of {max_bytes}; not read"
            )
        chunks = []
        left = opened.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break  # truncated while read: what was there
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks), opened
    except OSError as exc:
        raise RefusedError("io_error", f"read failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _output_folder(target: Path, root: str | os.PathLike[str]) -> None:
    """Create ``target``'s folder; refuse it when it leads outside ``root``."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not is_inside(folder, root):
        raise RefusedError(
            "outside_output",
            f"{printable(folder)} leads outside the output folder {printable(root)}; not written",
        )


def holds(target: str | os.PathLike[str], data: bytes) -> bool:
    """Whether ``target`` holds exactly ``data`` (a rerun wrote it before): False when nothing
    is there; :class:`RefusedError` ``output_exists`` when something else is (other bytes, a
    link, a folder): it is never overwritten."""
    try:
        held, _ = read_regular(target, max_bytes=len(data))
    except RefusedError as refused:
        if refused.code == "missing":
            return False
        held, why = None, refused.reason
    if held == data:
        return True
    raise RefusedError(
        "output_exists",
        f"{printable(target)} already holds another file "
        f"({why if held is None else 'different content'}); not overwritten",
    )


def link_exclusive(source: Path, target: Path, data: bytes | None = None) -> bool:
    """Give the finished file ``source`` (holding ``data``, read from it when None) the name
    ``target`` unless the name is taken, never through a link: True when linked, False when
    the name already held the same bytes (a rerun); anything else ``output_exists``."""
    try:
        os.link(source, target, follow_symlinks=False)  # fails if the name is taken
    except FileExistsError:
        if not holds(target, source.read_bytes() if data is None else data):
            raise RefusedError(
                "output_exists", f"{printable(target)} was taken and vanished; not written"
            ) from None
        return False
    return True


def publish(
    dest: str | os.PathLike[str],
    data: bytes,
    root: str | os.PathLike[str],
    *,
    mode: int = 0o644,
    exclusive: bool = False,
) -> bool:
    """Write ``data`` to ``dest`` (inside ``root``) through an exclusive temporary file and a
    rename. Returns False when ``exclusive`` and ``dest`` already holds exactly ``data`` (a
    rerun), True when written.

    Raises :class:`RefusedError`: ``outside_output`` when ``dest``'s folder, links followed,
    is not inside ``root``; with ``exclusive``, ``output_exists`` when ``dest`` holds something
    else (another input landed on the same output: never overwritten). ``OSError`` for the
    disk's own errors.
    """
    target = Path(dest)
    _output_folder(target, root)
    temp = target.parent / f".{target.name}.{secrets.token_hex(6)}.part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(temp, target)  # replaces a link at the name, never writes through it
            return True
        return link_exclusive(temp, target, data)
    finally:
        temp.unlink(missing_ok=True)


def promote(
    staged: str | os.PathLike[str], dest: str | os.PathLike[str], root: str | os.PathLike[str]
) -> bool:
    """Move a file :func:`publish` wrote into a staging folder to ``dest`` (inside ``root``),
    exclusively, as :func:`publish` with ``exclusive`` would: False when ``dest`` already holds
    the same bytes, :class:`RefusedError` ``output_exists`` when it holds others. The staged
    file is gone afterwards either way. A step stages what it may publish only after something
    else is committed (anonymize: the linkage of the file's patient)."""
    source, target = Path(staged), Path(dest)
    try:
        _output_folder(target, root)
        return link_exclusive(source, target)
    finally:
        source.unlink(missing_ok=True)


__all__ = [
    "MAX_FILE_BYTES",
    "RefusedError",
    "check_entry",
    "current_umask",
    "holds",
    "is_inside",
    "link_exclusive",
    "printable",
    "promote",
    "publish",
    "read_regular",
    "take_umask",
]


#: Permission bits owner-only data may not have (group and others).
OTHERS = 0o077


def lock_down(paths: list[Path]) -> list[str]:
    """Make each of ``paths`` that exists owner-only (its group and other bits cleared; a
    folder's contents are then out of others' reach whatever their own modes), and return a
    sentence for each one repaired. A path another user owns is refused (:class:`RefusedError`
    ``not_owner``): its owner must repair it. Symbolic links are followed (a home on another
    disk); what they point to is what is checked."""
    repaired = []
    me = os.geteuid()
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not mode & OTHERS:
            continue
        if st.st_uid != me:
            raise RefusedError(
                "not_owner",
                f"{printable(path)} holds identified data, is readable by others (mode "
                f"{mode:04o}) and belongs to user {st.st_uid}, not to this one ({me}): its owner "
                f"must run `chmod go-rwx {printable(path)}`",
            )
        os.chmod(path, mode & ~OTHERS)
        repaired.append(
            f"{printable(path)} held identified data readable by others (mode {mode:04o}): "
            f"now {mode & ~OTHERS:04o}"
        )
    return repaired


def current_umask() -> int:
    """This process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def take_umask(mask: int) -> None:
    """A worker process's initializer: the umask of the process that started the pool. A
    forkserver is started once per process and its children inherit *its* umask, the one of
    when the first pool started: an archive folder made by an ingest worker came out 0755 after
    an earlier pool in the same process had started under a login umask."""
    os.umask(mask)
