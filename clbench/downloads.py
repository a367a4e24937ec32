"""Getting the published data onto disk, or stopping with one line: fetch, verify, extract
safely, mark complete.

- ``fetch``: an archive is downloaded to ``<name>.part`` (gdown: Google Drive and plain HTTP,
  resuming an interrupted transfer), checked against its published MD5 (or a pinned SHA-256),
  and only then renamed; a mismatch deletes that ``.part`` file and says so. A file found in
  place (put there by hand) is verified too but never deleted: a mismatch is refused with the
  actual and expected checksum, and the user replaces or removes it.
- ``extract_fresh``: archives unpack into a temporary folder that is renamed when complete; no
  entry may land outside it (absolute names, ``..`` parts and escaping links are refused before
  anything is written, then tarfile's ``filter="data"`` guards the extraction itself).
- a benchmark folder is marked complete (``.clbench-complete-<protocol>.json``, with the split
  hash) only after verification, extraction and the image-count check; otherwise a run without
  ``--download`` stops with the command that fetches the data (``missing_data``).

Listing and transforming the images is ``clbench.datasets``; the pre-split archives that several
benchmarks share are ``clbench.presplit``.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clbench.errors import UsageError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """One file to download: where it is published and the checksum it must have."""

    filename: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    checksum_source: str = ""  # where the checksum value comes from (documentation)
    manual_url: str | None = None  # a page to fetch it by hand when the automatic download fails

    def __post_init__(self):
        if not (self.md5 or self.sha256):
            raise ValueError(f"{self.filename}: a Remote needs an md5 or a sha256")

    @classmethod
    def google_drive(cls, filename: str, drive_id: str, **checksum) -> "Remote":
        """A file shared on Google Drive by its id, with a page to fetch it by hand."""
        return cls(filename, f"https://drive.google.com/uc?id={drive_id}",
                   manual_url=f"https://drive.google.com/file/d/{drive_id}/view", **checksum)

    @property
    def algorithm(self) -> str:
        return "md5" if self.md5 else "sha256"

    @property
    def expected(self) -> str:
        return (self.md5 or self.sha256).lower()


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path) -> None:
    """The one function that touches the network. gdown handles Google Drive's confirmation page
    and plain HTTP alike, keeps interrupted transfers in its own temporary file and resumes them,
    and moves the result to ``dest`` only when the transfer is complete."""
    import gdown

    gdown.download(url, str(dest), quiet=False, resume=True)


def verify(path: Path, remote: Remote) -> None:
    """Check a file found in place (put there by hand, or downloaded and verified earlier):
    a wrong checksum is refused with both values and the file is left where it is."""
    actual = file_digest(path, remote.algorithm)
    if actual != remote.expected:
        raise UsageError(f"{path} is not the published {remote.filename}: its {remote.algorithm} "
                         f"is {actual}, expected {remote.expected}; replace it with the published "
                         "file, or remove it and rerun with --download (clbench leaves it as is)")


def verify_download(part: Path, remote: Remote) -> None:
    """Check clbench's own ``.part`` download; on a mismatch it (and only it) is deleted."""
    actual = file_digest(part, remote.algorithm)
    if actual != remote.expected:
        part.unlink(missing_ok=True)
        raise UsageError(f"checksum mismatch for {remote.filename}: expected "
                         f"{remote.expected}, got {actual}; the download was deleted, rerun "
                         "with --download")


def fetch(remote: Remote, folder: Path) -> Path:
    """``folder/filename``, verified; downloaded first (via ``.part``) when it is not there.

    A file already in place (for example put there by hand) is verified too, but never deleted:
    only clbench's own ``.part`` download is removed when its checksum is wrong."""
    final = folder / remote.filename
    if final.is_file():
        verify(final, remote)
        return final
    folder.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    try:
        download_file(remote.url, part)
    except UsageError:
        raise
    except Exception as exc:  # network, quota, HTTP errors: one line, never a traceback
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        by_hand = (f"; or download it by hand from {remote.manual_url} and put it at {final}"
                   if remote.manual_url else "")
        raise UsageError(f"download of {remote.filename} from {remote.url} failed "
                         f"({type(exc).__name__}: {reason}); rerun with --download to resume"
                         f"{by_hand}") from None
    if not part.is_file():
        raise UsageError(f"download of {remote.filename} from {remote.url} produced no file; "
                         "rerun with --download")
    verify_download(part, remote)
    part.replace(final)
    return final


# ----------------------------------------------------------------------------------- extraction

def _escapes(name: str) -> bool:
    """True for names that are absolute (POSIX or Windows) or climb with ``..``."""
    name = name.replace("\\", "/")
    return (name.startswith("/") or (len(name) > 1 and name[1] == ":")
            or ".." in PurePosixPath(name).parts)


def _unsafe(archive: Path, entry: str, dest: Path, what: str = "") -> UsageError:
    return UsageError(f"unsafe archive {archive.name}: entry {entry!r}{what} would be written "
                      f"outside {dest}; refusing to extract (delete the archive and rerun with "
                      "--download)")


def _check_tar(tar: tarfile.TarFile, archive: Path, dest: Path) -> None:
    for member in tar.getmembers():
        if _escapes(member.name):
            raise _unsafe(archive, member.name, dest)
        if member.issym() or member.islnk():
            base = posixpath.dirname(member.name) if member.issym() else ""
            target = posixpath.normpath(posixpath.join(base, member.linkname))
            if _escapes(member.linkname) or _escapes(target):
                raise _unsafe(archive, member.name, dest, f" (a link to {member.linkname!r})")


def _check_zip(archive_zip: zipfile.ZipFile, archive: Path, dest: Path) -> None:
    for info in archive_zip.infolist():
        if _escapes(info.filename):
            raise _unsafe(archive, info.filename, dest)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UsageError(f"unsafe archive {archive.name}: entry {info.filename!r} is a "
                             "symbolic link; refusing to extract (delete the archive and rerun "
                             "with --download)")


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a .zip or .tar[.gz] into ``dest``; every entry is checked before any is written."""
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as handle:
            _check_zip(handle, archive, dest)
            handle.extractall(dest)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as handle:
            _check_tar(handle, archive, dest)
            try:
                handle.extractall(dest, filter="data")
            except tarfile.FilterError as exc:
                raise UsageError(f"unsafe archive {archive.name}: {exc}; refusing to extract "
                                 "(delete the archive and rerun with --download)") from None
    else:
        raise UsageError(f"{archive} is neither a .zip nor a .tar archive")


def extract_fresh(archive: Path, dest: Path) -> Path:
    """Extract into ``dest.extracting`` then rename: ``dest`` exists only when complete."""
    staging = dest.with_name(dest.name + ".extracting")
    for stale in (staging, dest):
        if stale.exists():
            shutil.rmtree(stale)
    safe_extract(archive, staging)
    staging.rename(dest)
    return dest


# ------------------------------------------------------------------------------------- markers

def marker_path(folder: Path, protocol: str) -> Path:
    return folder / f".clbench-complete-{protocol}.json"


def read_marker(folder: Path, protocol: str) -> dict | None:
    path = marker_path(folder, protocol)
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(folder: Path, protocol: str, info: dict) -> None:
    path = marker_path(folder, protocol)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.replace(path)


def missing_data(bench: str, folder: Path, root: Path, extra: str = "",
                 existing: str = "") -> UsageError:
    """``existing``: how to use a copy the user already has (said before the download command)."""
    extra = f" {extra}" if extra else ""
    existing = f" {existing}" if existing else ""
    return UsageError(f"{bench} data not found in {folder};{existing} download it with: clbench "
                      f"run --bench {bench}{extra} --download --data-dir {root}")


def check_count(what: str, found: int, expected: int, folder: Path) -> None:
    if found != expected:
        raise UsageError(f"{what}: found {found} images, expected {expected}; this is not the "
                         f"published data (delete {folder} and rerun with --download)")
