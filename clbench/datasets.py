"""Shared plumbing of the downloadable benchmarks: fetch, verify, extract safely, list, transform.

Each step exists so that a run either reads exactly the published data or stops with one line:

- ``fetch``: an archive is downloaded to ``<name>.part`` (gdown: Google Drive and plain HTTP,
  resuming an interrupted transfer), checked against its published MD5 (or a pinned SHA-256),
  and only then renamed; a mismatch deletes that ``.part`` file and says so. A file found in
  place (put there by hand) is verified too but never deleted: a mismatch is refused with the
  actual and expected checksum, and the user replaces or removes it.
- ``extract_fresh``: archives unpack into a temporary folder that is renamed when complete; no
  entry may land outside it (absolute names, ``..`` parts and escaping links are refused before
  anything is written, then tarfile's ``filter="data"`` guards the extraction itself).
- a benchmark folder is marked complete (``.clbench-complete-<protocol>.json``, with the split
  hash) only after verification, extraction and the image-count check; a pre-split tree the user
  already has in the official layout (``<name>/train/<class>/``, ``<name>/test/<class>/``) is
  counted and marked the same way instead of downloaded; otherwise a run without ``--download``
  stops with the command that fetches the data.
- images are listed like torchvision's ``ImageFolder`` (sorted class folders → class ids, the
  official codes' convention), decoded with PIL, and transformed as in SD-LoRA's
  ``utils/data.py::build_transform`` (see ``train_transform`` / ``test_transform``).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clbench.benchmark import files_hash
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


# ------------------------------------------------------------------------------------- listing

def list_image_folder(folder: Path, class_to_idx: dict[str, int] | None = None):
    """``(relative files, class ids, class_to_idx)`` exactly as torchvision's ImageFolder orders
    them (sorted class folders, sorted files, its image extensions)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if class_to_idx is None:
        _, class_to_idx = find_classes(str(folder))
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    files = [os.path.relpath(path, folder).replace(os.sep, "/") for path, _ in samples]
    return files, [int(label) for _, label in samples], class_to_idx


def split_identity(protocol: str, train: tuple[list[str], list[int]],
                   test: tuple[list[str], list[int]]) -> dict:
    """Protocol name, sizes and a hash of every (split, relative file, label): two runs with the
    same hash read the same images with the same labels."""
    names = [f"{split}/{name}\t{label}" for split, (files, labels) in (("train", train), ("test", test))
             for name, label in zip(files, labels)]
    return {"protocol": protocol, "n_train": len(train[0]), "n_test": len(test[0]),
            "hash": files_hash(names)}


class ImageFiles:
    """A torch-style dataset of image files: ``(transform(RGB image), original class id)``."""

    def __init__(self, root: Path, files: list[str], targets: list[int], transform):
        self.root = Path(root)
        self.files = files
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.root / self.files[index]) as image:
            rgb = image.convert("RGB")
        return self.transform(rgb), self.targets[index]


# ---------------------------------------------------------------------------------- transforms

# Both end in PILToTensor: images travel from the loader workers to the model as uint8 (a
# quarter of ToTensor's float32 bytes through shared memory, pinning and the host-to-device
# copy); ``CLModel.normalize`` then gives exactly ToTensor's values (x/255, float32).

def train_transform(size: int):
    """SD-LoRA official: RandomResizedCrop(S, scale=(0.05, 1), ratio 3/4–4/3, bilinear), flip,
    ToTensor (its scaling to [0, 1] done by the model); no mean/std normalisation."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, scale=(0.05, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])


def test_transform(size: int):
    """SD-LoRA official: Resize(256, bicubic) + CenterCrop(224) at S=224, i.e. Resize(int(S·8/7))."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.PILToTensor()])


# ------------------------------------------------- pre-split ImageFolder archives (ADAM / PILOT)

def find_split_root(folder: Path) -> Path:
    """The one folder (``folder`` itself or up to two levels down) holding ``train/`` and
    ``test/``: the RevisitingCIL archives differ in their top-level folder names."""
    levels = [folder, *folder.glob("*"), *folder.glob("*/*")]
    found = [d for d in levels if "__MACOSX" not in d.parts
             and (d / "train").is_dir() and (d / "test").is_dir()]
    if len(found) != 1:
        raise UsageError(f"expected one folder with train/ and test/ inside {folder}, found "
                         f"{len(found)}; delete {folder} and rerun with --download")
    return found[0]


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _count_presplit(bench, split_root: Path, where: Path, fix: str) -> dict:
    """Check that ``train/`` and ``test/`` hold the same ``bench.n_classes`` class folders, each
    with images; return the sizes and the split hash (what the completion marker records)."""
    train_classes = _class_folders(split_root / "train")
    test_classes = _class_folders(split_root / "test")
    if len(train_classes) != bench.n_classes or test_classes != train_classes:
        odd = sorted(set(train_classes) ^ set(test_classes))
        detail = f" (e.g. {odd[0]!r} is in only one of them)" if odd else ""
        raise UsageError(f"{where}: expected the same {bench.n_classes} class folders in train/ "
                         f"and test/, found {len(train_classes)} and {len(test_classes)}{detail}; "
                         f"{fix}")
    try:
        train, train_labels, class_to_idx = list_image_folder(split_root / "train")
        test, test_labels, _ = list_image_folder(split_root / "test", class_to_idx)
    except FileNotFoundError as exc:  # torchvision: a class folder without any image
        reason = str(exc).splitlines()[0][:160]
        raise UsageError(f"{where}: {reason}; {fix}") from None
    identity = split_identity("", (train, train_labels), (test, test_labels))
    return {"n_train": len(train), "n_test": len(test), "hash": identity["hash"]}


def adopt_extracted(bench, folder: Path, protocol: str, expected_total: int,
                    archive: str) -> dict:
    """Accept a tree the user already has in the official codes' layout (``folder/train/<class>/``
    and ``folder/test/<class>/``, what SD-LoRA's and LAMDA-PILOT's ``utils/data.py`` read from
    ``./data/<name>/``): verify class folders and the image count, then write the completion
    marker with the split hash. Nothing in the tree is moved or deleted."""
    missing = [name for name in ("train", "test") if not (folder / name).is_dir()]
    fix = ("replace it with the published extracted tree, or move it away and rerun with "
           "--download")
    if missing:
        raise UsageError(f"{folder} has {'train/' if missing == ['test'] else 'test/'} but no "
                         f"{missing[0]}/: the official layout is {folder}/train/<class>/… and "
                         f"{folder}/test/<class>/…; add it, or move the folder away and rerun "
                         "with --download")
    info = _count_presplit(bench, folder, folder, fix)
    found = info["n_train"] + info["n_test"]
    if found != expected_total:
        raise UsageError(f"{folder}: train/ and test/ hold {found} images, expected "
                         f"{expected_total} (the published {archive} split); {fix}")
    info.update(split_root=".", source="existing extracted tree (official layout)")
    try:
        write_marker(folder, protocol, info)
    except OSError:
        pass  # a read-only shared copy: verified now, verified again on the next run
    return info


def prepare_presplit(bench, remote: Remote, folder: Path, protocol: str, expected_total: int,
                     extra_args: str = "") -> tuple[Path, dict]:
    """The folder holding ``train/`` and ``test/`` and its completion marker. In order: a
    folder already marked complete; an extracted tree in the official layout (verified and
    marked, never downloaded again); else download, verify, extract and count the archive."""
    marker = read_marker(folder, protocol)
    if marker is not None:
        return folder / marker["split_root"], {**marker, "file": str(marker_path(folder, protocol))}
    if (folder / "train").exists() or (folder / "test").exists():
        return folder, adopt_extracted(bench, folder, protocol, expected_total, remote.filename)
    if not bench.download:
        raise missing_data(bench.name, folder, bench.root, extra_args, existing=(
            f"if you already have it extracted, put it at {folder}/train/<class>/… and "
            f"{folder}/test/<class>/… (the official layout), else"))
    archive = fetch(remote, folder)
    split_root = find_split_root(extract_fresh(archive, folder / protocol))
    info = _count_presplit(bench, split_root, split_root,
                           f"delete {folder} and rerun with --download")
    check_count(f"{bench.name} ({protocol})", info["n_train"] + info["n_test"], expected_total,
                folder)
    info.update(split_root=split_root.relative_to(folder).as_posix(), archive=remote.filename,
                **{remote.algorithm: remote.expected})
    write_marker(folder, protocol, info)
    return split_root, info


def load_presplit(split_root: Path, protocol: str, image_size: int, marker: dict | None = None):
    """The split's datasets; the files and labels must still hash to what the marker recorded
    when the folder was verified (markers written before the hash was recorded are trusted)."""
    from clbench.benchmark import SplitData

    train_files, train_targets, class_to_idx = list_image_folder(split_root / "train")
    test_files, test_targets, _ = list_image_folder(split_root / "test", class_to_idx)
    identity = split_identity(protocol, (train_files, train_targets), (test_files, test_targets))
    recorded = (marker or {}).get("hash")
    if recorded is not None and recorded != identity["hash"]:
        raise UsageError(f"{split_root}: the images changed since the folder was verified "
                         f"({identity['n_train']} train / {identity['n_test']} test now, "
                         f"{marker.get('n_train')} / {marker.get('n_test')} then); restore them, "
                         f"or delete {marker.get('file', 'its .clbench-complete marker')} to "
                         "verify the folder again")
    return SplitData(
        ImageFiles(split_root / "train", train_files, train_targets, train_transform(image_size)),
        ImageFiles(split_root / "test", test_files, test_targets, test_transform(image_size)),
        identity)


class PresplitBenchmark:
    """Mixin for a ``Benchmark`` distributed as one archive of pre-split ``train/`` and ``test/``
    folders (the ADAM/RevisitingCIL and LAMDA-PILOT archives): subclasses set ``remotes``,
    ``folder_name`` and ``protocol``."""

    remotes: dict = {}
    folder_name = ""
    protocol = ""
    expected_counts = {"adam": 0}

    def load(self, image_size: int):
        split_root, marker = prepare_presplit(self, self.remotes["adam"],
                                              self.root / self.folder_name, "adam",
                                              self.expected_counts["adam"])
        return load_presplit(split_root, self.protocol, image_size, marker)
