"""Benchmarks distributed as one archive of pre-split ``train/`` and ``test/`` ImageFolder trees
(the ADAM/RevisitingCIL and LAMDA-PILOT archives that SD-LoRA's code reads: ImageNet-R's
``sdlora`` split, ImageNet-A, CUB-200).

A folder already marked complete is read as is; a tree the user already has in the official
layout (``<name>/train/<class>/``, ``<name>/test/<class>/``) is counted and marked instead of
downloaded; otherwise the archive is fetched, verified, extracted and counted
(``clbench.downloads``). Reading checks that the files and labels still hash to what the marker
recorded. ``PresplitBenchmark`` is the base of a benchmark that is nothing but such an archive:
a subclass only declares its constants.
"""
from __future__ import annotations

import os
from pathlib import Path

from clbench.benchmark import Benchmark, SplitData, divisors_as_choices
from clbench.datasets import (ImageFiles, list_image_folder, split_identity, test_transform,
                              train_transform)
from clbench.downloads import (Remote, check_count, extract_fresh, fetch, marker_path,
                               missing_data, read_marker, write_marker)
from clbench.errors import UsageError


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


class PresplitBenchmark(Benchmark):
    """A ``Benchmark`` that is one pre-split archive. Subclasses declare ``n_classes``,
    ``remotes`` (``{"adam": Remote}``), ``folder_name``, ``protocol`` and ``expected_counts``
    (``{"adam": total images}``); the task choices are the divisors of ``n_classes`` in
    ``task_range``, 10 tasks and seed 1993 by default (SD-LoRA's protocol)."""

    remotes: dict = {}
    folder_name = ""
    protocol = ""
    expected_counts = {"adam": 0}
    task_range = range(2, 51)
    default_tasks = 10
    default_seeds = (1993,)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "task_choices" not in cls.__dict__:
            cls.task_choices = divisors_as_choices(cls.n_classes, cls.task_range)

    def load(self, image_size: int):
        split_root, marker = prepare_presplit(self, self.remotes["adam"],
                                              self.root / self.folder_name, "adam",
                                              self.expected_counts["adam"])
        return load_presplit(split_root, self.protocol, image_size, marker)
