"""A user's text file, edited without destroying anything: what ``vscode init`` writes through.

- :func:`read` follows a symlink to the file it names (a dangling one is refused), and remembers
  the exact bytes, the byte-order mark, CRLF line ends and the permission bits.
- :func:`write` writes a temporary file next to the target and renames it over the target, so a
  crash leaves the old file whole; the target keeps its mode (and owner, where allowed), BOM and
  line ends, and a link stays a link.
- :func:`save_backup` copies the exact old bytes to ``NAME.bak`` (then ``NAME.bak.1``, ...): a
  backup is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

BOM = b"\xef\xbb\xbf"


class FileRefused(ValueError):
    """A file we must not (or cannot) edit; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class TextFile:
    """One file as read: ``text`` has no BOM and ``\\n`` line ends; the rest restores them.
    ``utf8`` is False when the bytes are not UTF-8 (``text`` then marks the bad bytes).
    """

    path: Path  # as the user names it (maybe a link)
    target: Path  # the file itself
    raw: bytes
    text: str
    bom: bool
    crlf: bool
    utf8: bool
    mode: int
    uid: int
    gid: int

    def encode(self, text: str) -> bytes:
        """``text`` in this file's encoding: its BOM and line ends.

        >>> f = TextFile(path=Path("a"), target=Path("a"), raw=b"", text="", bom=True,
        ...              crlf=True, utf8=True, mode=0o644, uid=0, gid=0)
        >>> f.encode("{\\n}")
        b'\\xef\\xbb\\xbf{\\r\\n}'
        """
        if self.crlf:
            text = text.replace("\n", "\r\n")
        return (BOM if self.bom else b"") + text.encode("utf-8")


def target_of(path: Path) -> Path:
    """The file ``path`` names: itself, or what its symlink points to (must exist)."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target, or a loop of links
        raise FileRefused(f"{path} is a link to {os.readlink(path)}, which does not exist; "
                          "point the link at a file, or remove it") from None


def read(path: Path) -> TextFile | None:
    """``path`` as a :class:`TextFile`, or None when there is no such file."""
    target = target_of(path)
    if not target.exists():
        return None
    if not target.is_file():
        raise FileRefused(f"{path} is not a file; move it away, then run again")
    info = target.stat()
    raw = target.read_bytes()
    bom = raw.startswith(BOM)
    body = raw[len(BOM) if bom else 0:]
    try:
        text, utf8 = body.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = body.decode("utf-8", errors="replace"), False
    crlf = "\n" in text and text.count("\r\n") == text.count("\n")
    return TextFile(path=path, target=target, raw=raw, text=text.replace("\r\n", "\n") if crlf
                    else text, bom=bom, crlf=crlf, utf8=utf8, mode=stat.S_IMODE(info.st_mode),
                    uid=info.st_uid, gid=info.st_gid)


def check_writable(file: TextFile) -> None:
    """Refuse a read-only file (also as root, who could write it anyway)."""
    if not file.mode & 0o222 or not os.access(file.target, os.W_OK):
        raise FileRefused(f"{file.path} is read-only (mode {file.mode:o}): it was left as it "
                          f"is; make it writable (chmod u+w {file.target}) and run again")


def save_backup(path: Path, raw: bytes) -> Path:
    """Copy ``raw`` to the first free ``NAME.bak``, ``NAME.bak.1``, ...; never overwrites."""
    for n in range(10_000):
        backup = path.with_name(path.name + (".bak" if n == 0 else f".bak.{n}"))
        try:
            with open(backup, "xb") as f:  # "x": fails if it exists, even in a race
                f.write(raw)
            return backup
        except FileExistsError:
            continue
    raise FileRefused(f"{path.parent} holds 10,000 backups of {path.name}; remove some")


def free_backup_name(path: Path) -> Path:
    """The name :func:`save_backup` would use now (for a dry run's notes)."""
    n = 0
    while path.with_name(path.name + (".bak" if n == 0 else f".bak.{n}")).exists():
        n += 1
    return path.with_name(path.name + (".bak" if n == 0 else f".bak.{n}"))


def write(target: Path, data: bytes, *, like: TextFile | None = None) -> None:
    """Replace ``target`` by ``data`` atomically; mode (and owner) as ``like``'s, or as a new
    file would get."""
    target.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, like.mode if like else 0o666 & ~_umask())  # mkstemp makes 0600
        if like and (like.uid, like.gid) != (os.geteuid(), os.getegid()):
            # root editing a user's file: it stays theirs (a normal user cannot give a file
            # away: then it becomes theirs, as with any editor)
            with contextlib.suppress(PermissionError):
                os.chown(tmp, like.uid, like.gid)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass  # not Linux: fall through to the classic set-and-restore
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
