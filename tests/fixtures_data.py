"""Miniature copies of the benchmarks' published layouts, and a local HTTP server to fetch them.

Each generator writes the same structure as the real archive (folder names, list formats,
pickles) with a few tiny JPEGs per class, so the benchmark code runs unchanged; only the URLs and
checksums differ, and the tests swap those in.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def digest(path: Path, algorithm: str = "md5") -> str:
    return hashlib.new(algorithm, Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _jpeg_bytes(size: int, variant: int) -> bytes:
    """A smooth random picture (upsampled 6×6 noise + grain) so JPEG sizes look natural."""
    rng = np.random.default_rng(variant)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_jpeg(path: Path, size: int, seed: int, variants: int = 32) -> None:
    """One of ``variants`` distinct pictures per size (encoding thousands is the slow part;
    the benchmarks identify images by path and label, not by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(size, seed % variants))


def image_tree(folder: Path, classes: list[str], per_class: int, size: int, seed: int = 0,
               stem: str = "img") -> list[str]:
    """``folder/<class>/<stem>_<i>.jpg``; returns the relative paths."""
    names = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}/{stem}_{i}.jpg"
            write_jpeg(folder / rel, size, seed * 1_000_003 + c * 1009 + i)
            names.append(rel)
    return names


def zip_tree(source: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for path in sorted(source.rglob("*")):
            handle.write(path, path.relative_to(source).as_posix())
    return archive


def tar_tree(source: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as handle:
        for path in sorted(source.iterdir()):
            handle.add(path, path.name)
    return archive


def wnids(n: int) -> list[str]:
    return [f"n{1_000_000 + 7919 * i:08d}" for i in range(n)]


def presplit_tree(folder: Path, classes: list[str], n_train: int, n_test: int,
                  size: int = 12) -> Path:
    """An extracted ADAM/PILOT tree as the official codes read it: ``folder/train/<class>/*.jpg``
    and ``folder/test/<class>/*.jpg``."""
    image_tree(folder / "train", classes, n_train, size, seed=1)
    image_tree(folder / "test", classes, n_test, size, seed=2)
    return folder


def presplit_zip(workdir: Path, archive_name: str, top: str, classes: list[str], n_train: int,
                 n_test: int, size: int = 12) -> Path:
    """The ADAM/RevisitingCIL archive: ``<top>/train/<class>/*.jpg`` and ``<top>/test/...``."""
    source = workdir / f"src-{archive_name}"
    presplit_tree(source / top, classes, n_train, n_test, size)
    return zip_tree(source, workdir / archive_name)


def imagenet_r_original(workdir: Path, classes: list[str], n_train: int, n_test: int,
                        size: int = 12) -> dict[str, Path]:
    """The authors' ``imagenet-r.tar`` (``imagenet-r/<wnid>/<style>_<i>.jpg`` + README) and
    CODA-Prompt-style yaml lists (``data: [data/imagenet-r/...]``, ``targets: [...]``)."""
    source = workdir / "src-imagenet-r"
    files = image_tree(source / "imagenet-r", classes, n_train + n_test, size, seed=3, stem="art")
    (source / "imagenet-r" / "README.txt").write_text("fixture\n")
    per = n_train + n_test
    train = [f for i, f in enumerate(files) if i % per < n_train]
    test = [f for i, f in enumerate(files) if i % per >= n_train]
    shuffled = {c: (len(classes) - 1 - k) for k, c in enumerate(classes)}  # CODA's own numbering
    out = {"tar": tar_tree(source, workdir / "imagenet-r.tar")}
    for split, names in (("train", train), ("test", test)):
        lines = ["data:"] + [f"- data/imagenet-r/{n}" for n in names]
        lines += ["targets:"] + [f"- {shuffled[n.split('/')[0]]}" for n in names]
        out[split] = workdir / f"imagenet-r_{split}.yaml"
        out[split].write_text("\n".join(lines) + "\n")
    return out


def cifar100_tar(workdir: Path, n_train: int, n_test: int) -> tuple[Path, dict[str, str]]:
    """``cifar-100-python/{train,test,meta}`` pickles as torchvision reads them; returns the
    archive and the MD5 of each pickle (torchvision checks them)."""
    rng = np.random.default_rng(5)
    source = workdir / "src-cifar" / "cifar-100-python"
    source.mkdir(parents=True)
    for split, per in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(100) for _ in range(per)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(source / split, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels,
                         "coarse_labels": [c // 5 for c in labels]}, handle)
    with open(source / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class{c}" for c in range(100)]}, handle)
    md5s = {name: digest(source / name) for name in ("train", "test", "meta")}
    return tar_tree(source.parent, workdir / "cifar-100-python.tar.gz"), md5s


def domainnet_files(workdir: Path, domains: list[str], n_classes: int = 345,
                    size: int = 10) -> dict[str, Path]:
    """``<domain>.zip`` holding ``<domain>/<class>/<domain>_<i>.jpg`` and the official-style
    ``<domain>_{train,test}.txt`` lists (``<path> <label>``). Class c lives in domain c mod len."""
    out = {}
    classes = [f"class_{c:03d}" for c in range(n_classes)]
    for d, domain in enumerate(domains):
        source = workdir / f"src-{domain}"
        mine = [c for c in range(n_classes) if c % len(domains) == d]
        lists = {"train": [], "test": []}
        for c in mine:
            for i, split in enumerate(("train", "test")):
                rel = f"{domain}/{classes[c]}/{domain}_{i}.jpg"
                write_jpeg(source / rel, size, seed=c * 11 + i + d * 7)
                lists[split].append(f"{rel} {c}")
        out[f"{domain}.zip"] = zip_tree(source, workdir / f"{domain}.zip")
        for split, lines in lists.items():
            out[f"{domain}_{split}.txt"] = workdir / f"{domain}_{split}.txt"
            out[f"{domain}_{split}.txt"].write_text("\n".join(lines) + "\n")
    return out


def evil_tar(path: Path, kind: str) -> Path:
    """A tar with one escaping entry: ``dotdot`` (``../evil.txt``), ``absolute`` (``/tmp/...``)
    or ``symlink`` (a link to ``/etc/passwd``)."""
    with tarfile.open(path, "w") as handle:
        good = tarfile.TarInfo("ok/fine.txt")
        good.size = 2
        handle.addfile(good, io.BytesIO(b"ok"))
        if kind == "symlink":
            bad = tarfile.TarInfo("ok/link")
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
            handle.addfile(bad)
        else:
            name = "../evil.txt" if kind == "dotdot" else "/tmp/clbench-evil.txt"
            bad = tarfile.TarInfo(name)
            bad.size = 4
            handle.addfile(bad, io.BytesIO(b"evil"))
    return path


def evil_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as handle:
        handle.writestr("ok/fine.txt", "ok")
        handle.writestr("../evil.txt", "evil")
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on 127.0.0.1 (a free port) for the duration; yields the base URL."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
