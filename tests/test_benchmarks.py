"""The SD-LoRA benchmarks on generated miniatures of their real layouts.

The archives are served by a local HTTP server and fetched by the real download function, so
download, verification, safe extraction, count checks, listing, labels and transforms all run as
they do on the published data; only URLs, checksums and expected counts are swapped.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import fixtures_data as fx
from clbench import datasets, downloads, presplit
from clbench.benchmarks import cifar100, cub200, domainnet, imagenet_a, imagenet_r
from clbench.downloads import Remote, marker_path, safe_extract
from clbench.errors import UsageError

DN_DOMAINS = list(domainnet.DOMAINS)
PINNED_IMAGENET_A_FIXTURE_HASH = "06829418963b6fa8cbff4a2a7bfc538965d9872ff8c2d1d9c5cb6d467720e90f"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every benchmark's miniature archive, served on 127.0.0.1."""
    work = tmp_path_factory.mktemp("served")
    files = {
        "imagenet-r.zip": fx.presplit_zip(work, "imagenet-r.zip", "imagenet-r", fx.wnids(200), 2, 1, size=20),
        "ina.zip": fx.presplit_zip(work, "ina.zip", "imagenet-a", fx.wnids(200), 1, 1),
        "cub.zip": fx.presplit_zip(work, "cub.zip", "cub",
                                   [f"{i:03d}.Bird_{i}" for i in range(1, 201)], 1, 1),
    }
    original = fx.imagenet_r_original(work, fx.wnids(200), 2, 1)
    files.update({"imagenet-r.tar": original["tar"], "imagenet-r_train.yaml": original["train"],
                  "imagenet-r_test.yaml": original["test"]})
    files["cifar-100-python.tar.gz"], cifar_md5 = fx.cifar100_tar(work, 2, 1)
    files.update(fx.domainnet_files(work, DN_DOMAINS))
    with fx.serve(work) as base:
        yield {"base": base, "files": files, "cifar_md5": cifar_md5}


def _local(remote: Remote, served) -> Remote:
    path = served["files"][remote.filename]
    return dataclasses.replace(remote, url=f"{served['base']}/{path.name}",
                               **{remote.algorithm: fx.digest(path, remote.algorithm)})


@pytest.fixture
def local_data(served, monkeypatch):
    """Point every benchmark at the served miniatures and expect the miniatures' counts."""
    for module in (imagenet_r, imagenet_a, cub200, cifar100, domainnet):
        for key, remote in list(module.REMOTES.items()):
            monkeypatch.setitem(module.REMOTES, key, _local(remote, served))
    monkeypatch.setattr(imagenet_r.ImageNetR, "expected_counts", {"sdlora": 600, "coda": 600})
    monkeypatch.setattr(imagenet_a.ImageNetA, "expected_counts", {"adam": 400})
    monkeypatch.setattr(cub200.CUB200, "expected_counts", {"adam": 400})
    monkeypatch.setattr(cifar100.CIFAR100, "expected_counts", {"train": 200, "test": 100})
    per_domain = {d: (len(range(i, 345, 6)),) * 2 for i, d in enumerate(DN_DOMAINS)}
    monkeypatch.setattr(domainnet.DomainNet, "expected_counts", per_domain)
    from torchvision.datasets import CIFAR100 as TV

    md5 = served["cifar_md5"]
    monkeypatch.setattr(TV, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(TV, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(TV, "meta", {**TV.meta, "md5": md5["meta"]})
    return served


CASES = {  # id: (class, config, n_train, n_test, n_classes)
    "imagenet-r-sdlora": (imagenet_r.ImageNetR, None, 400, 200, 200),
    "imagenet-r-coda": (imagenet_r.ImageNetR, imagenet_r.ImageNetRConfig(split="coda"), 400, 200, 200),
    "imagenet-a": (imagenet_a.ImageNetA, None, 200, 200, 200),
    "cub200": (cub200.CUB200, None, 200, 200, 200),
    "cifar100": (cifar100.CIFAR100, None, 200, 100, 100),
    "domainnet": (domainnet.DomainNet, None, 345, 345, 345),
}


def _abs_files(dataset) -> set[Path]:
    return {dataset.root / f for f in dataset.files}


@pytest.mark.parametrize("case", list(CASES))
def test_download_verify_extract_load(case, local_data, tmp_path):
    cls, config, n_train, n_test, n_classes = CASES[case]
    split = cls(config, data_dir=tmp_path, download=True).load(16)
    assert (split.identity["n_train"], split.identity["n_test"]) == (n_train, n_test)
    assert (len(split.train), len(split.test)) == (n_train, n_test)
    for dataset in (split.train, split.test):
        assert set(dataset.targets) == set(range(n_classes))
    x, y = split.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8  # pixels; the model scales them
    assert int(x.max()) > int(x.min()) and isinstance(y, int)  # a real image, not a blank
    assert split.test[len(split.test) - 1][0].shape == (3, 16, 16)
    if hasattr(split.train, "files"):
        assert not _abs_files(split.train) & _abs_files(split.test)
        assert all(p.is_file() for p in _abs_files(split.train) | _abs_files(split.test))
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.extracting"))
    assert list(tmp_path.rglob(".clbench-complete-*.json"))
    # Offline reload: same split identity (hash of files + labels), at any input size.
    again = cls(config, data_dir=tmp_path, download=False).load(24)
    assert again.identity == split.identity
    assert again.train[0][0].shape == (3, 24, 24)


def test_identity_hash_tracks_files_and_labels(local_data, tmp_path):
    split = imagenet_a.ImageNetA(data_dir=tmp_path, download=True).load(16)
    files, labels = split.train.files, split.train.targets
    test = (split.test.files, split.test.targets)
    same = datasets.split_identity(split.identity["protocol"], (files, labels), test)
    assert same == split.identity
    relabelled = datasets.split_identity(split.identity["protocol"], (files, labels[::-1]), test)
    dropped = datasets.split_identity(split.identity["protocol"], (files[1:], labels[1:]), test)
    assert relabelled["hash"] != split.identity["hash"] != dropped["hash"]
    assert split.identity["hash"] == PINNED_IMAGENET_A_FIXTURE_HASH  # the recipe must not drift


def test_coda_split_reads_lists_with_imagefolder_class_ids(local_data, tmp_path):
    bench = imagenet_r.ImageNetR(imagenet_r.ImageNetRConfig(split="coda"), data_dir=tmp_path,
                                 download=True)
    split = bench.load(16)
    assert split.identity["protocol"] == "imagenet-r-coda-prompt-lists"
    listed = [line[len("- data/"):] for line in
              local_data["files"]["imagenet-r_train.yaml"].read_text().splitlines()
              if line.startswith("- data/")]
    assert split.train.files == listed
    ids = {w: i for i, w in enumerate(sorted(fx.wnids(200)))}
    assert split.train.targets == [ids[f.split("/")[1]] for f in listed]  # not CODA's numbering
    sdlora = imagenet_r.ImageNetR(data_dir=tmp_path, download=True).load(16)
    assert sdlora.identity["protocol"] != split.identity["protocol"]
    assert sdlora.identity["hash"] != split.identity["hash"]


def test_checksum_mismatch_deletes_only_clbenchs_own_download(local_data, tmp_path, monkeypatch):
    good = imagenet_a.REMOTES["adam"]
    monkeypatch.setitem(imagenet_a.REMOTES, "adam", dataclasses.replace(good, md5="0" * 32))
    with pytest.raises(UsageError) as info:
        imagenet_a.ImageNetA(data_dir=tmp_path, download=True).load(16)
    assert str(info.value) == (f"checksum mismatch for ina.zip: expected {'0' * 32}, got "
                               f"{good.md5}; the download was deleted, rerun with --download")
    folder = tmp_path / "imagenet-a"
    assert not (folder / "ina.zip").exists() and not (folder / "ina.zip.part").exists()
    assert not marker_path(folder, "adam").exists()
    # A file put in place by hand (what the download-failure message invites) is verified the
    # same way but never deleted: refused with both checksums, left for the user to replace.
    (folder / "ina.zip").write_bytes(b"not the archive")
    actual = downloads.file_digest(folder / "ina.zip", "md5")
    with pytest.raises(UsageError) as info:
        imagenet_a.ImageNetA(data_dir=tmp_path, download=True).load(16)
    assert str(info.value) == (
        f"{folder / 'ina.zip'} is not the published ina.zip: its md5 is {actual}, expected "
        f"{'0' * 32}; replace it with the published file, or remove it and rerun with "
        "--download (clbench leaves it as is)")
    assert (folder / "ina.zip").read_bytes() == b"not the archive"


def test_hand_placed_coda_lists_with_a_wrong_checksum_are_kept(local_data, tmp_path, monkeypatch):
    """CODA-Prompt's lists put beside the user's own images by hand: a wrong one is refused and
    both lists stay where they are (nothing is downloaded over them either)."""
    monkeypatch.setattr(downloads, "download_file", lambda *a: pytest.fail("downloaded"))
    folder = tmp_path / "imagenet-r"
    _own_coda_tree(local_data, folder, with_lists=True)
    listed = folder / "imagenet-r_train.yaml"
    listed.write_text(listed.read_text() + "# edited by hand\n")
    before = listed.read_bytes()
    coda = imagenet_r.ImageNetRConfig(split="coda")
    for download in (False, True):
        with pytest.raises(UsageError) as info:
            imagenet_r.ImageNetR(coda, data_dir=tmp_path, download=download).load(16)
        message = str(info.value)
        assert message.startswith(f"{listed} is not the published imagenet-r_train.yaml: its "
                                  f"sha256 is {downloads.file_digest(listed, 'sha256')}, expected "
                                  f"{imagenet_r.REMOTES['coda-train'].sha256}")
        assert "\n" not in message and "replace it" in message
        assert listed.read_bytes() == before and (folder / "imagenet-r_test.yaml").is_file()
    assert not marker_path(folder, "coda").exists()


@pytest.mark.parametrize("kind", ["tar-dotdot", "tar-absolute", "tar-symlink", "zip-dotdot"])
def test_escaping_archive_entries_are_refused(kind, tmp_path):
    fmt, what = kind.split("-")
    archive = (fx.evil_zip(tmp_path / "evil.zip") if fmt == "zip"
               else fx.evil_tar(tmp_path / "evil.tar", what))
    dest = tmp_path / "inside" / "dest"
    with pytest.raises(UsageError, match="unsafe archive evil"):
        safe_extract(archive, dest)
    assert not (tmp_path / "inside" / "evil.txt").exists()
    assert not Path("/tmp/clbench-evil.txt").exists()
    assert not list(dest.rglob("*"))  # checked before anything is written


def test_escaping_entry_in_a_benchmark_archive(local_data, tmp_path, monkeypatch):
    evil = fx.evil_zip(local_data["files"]["cub.zip"].parent / "evil-cub.zip")  # served
    monkeypatch.setitem(local_data["files"], "cub.zip", evil)
    monkeypatch.setitem(cub200.REMOTES, "adam", _local(cub200.REMOTES["adam"], local_data))
    with pytest.raises(UsageError, match="unsafe archive cub.zip: entry '../evil.txt'"):
        cub200.CUB200(data_dir=tmp_path / "data", download=True).load(16)
    assert not (tmp_path / "data" / "evil.txt").exists()
    assert not marker_path(tmp_path / "data" / "cub", "adam").exists()


@pytest.mark.parametrize("cls, config, extra", [
    (imagenet_r.ImageNetR, None, ""),
    (imagenet_r.ImageNetR, imagenet_r.ImageNetRConfig(split="coda"), " --set split=coda"),
    (cifar100.CIFAR100, None, ""),
    (domainnet.DomainNet, domainnet.DomainNetConfig(domains="real,sketch"), " --set domains=real,sketch"),
])
def test_missing_data_is_one_line_naming_folder_and_command(cls, config, extra, tmp_path):
    bench = cls(config, data_dir=tmp_path)
    with pytest.raises(UsageError) as info:
        bench.load(16)
    message = str(info.value)
    assert "\n" not in message
    folder = {"imagenet-r": "imagenet-r", "cifar100": "cifar100", "domainnet": "domainnet"}[bench.name]
    assert f"not found in {tmp_path / folder};" in message
    assert message.endswith(f"clbench run --bench {bench.name}{extra} --download --data-dir {tmp_path}")


def test_wrong_count_is_an_error_and_leaves_no_marker(local_data, tmp_path, monkeypatch):
    monkeypatch.setattr(imagenet_a.ImageNetA, "expected_counts", {"adam": 401})
    with pytest.raises(UsageError, match=r"found 400 images, expected 401"):
        imagenet_a.ImageNetA(data_dir=tmp_path, download=True).load(16)
    assert not marker_path(tmp_path / "imagenet-a", "adam").exists()
    with pytest.raises(UsageError, match="not found"):
        imagenet_a.ImageNetA(data_dir=tmp_path).load(16)
    monkeypatch.setattr(imagenet_a.ImageNetA, "expected_counts", {"adam": 400})
    imagenet_a.ImageNetA(data_dir=tmp_path, download=True).load(16)  # re-extracts the kept archive
    assert marker_path(tmp_path / "imagenet-a", "adam").exists()


def test_failed_drive_download_says_where_to_put_the_archive(tmp_path, monkeypatch):
    import gdown

    calls = {}

    def refuse(url, output, **kwargs):
        calls.update(url=url, **kwargs)
        raise RuntimeError("Too many users have viewed or downloaded this file recently")

    monkeypatch.setattr(gdown, "download", refuse)
    with pytest.raises(UsageError) as info:
        imagenet_r.ImageNetR(data_dir=tmp_path, download=True).load(16)
    message = str(info.value)
    assert calls["url"] == f"https://drive.google.com/uc?id={imagenet_r.DRIVE_ID}" and calls["resume"]
    assert "\n" not in message and "rerun with --download to resume" in message
    assert f"put it at {tmp_path / 'imagenet-r' / 'imagenet-r.zip'}" in message


def test_task_choices_seeds_and_options(tmp_path):
    r = imagenet_r.ImageNetR(data_dir=tmp_path)
    assert {t: r.n_classes // t for t in (5, 10, 20)} == {5: 40, 10: 20, 20: 10}
    assert r.default_seeds == (1995,) and r.class_order(1995)[:6] == [146, 198, 169, 126, 142, 183]
    a = imagenet_a.ImageNetA(data_dir=tmp_path)
    assert a.class_order(1993)[:6] == [168, 136, 51, 9, 183, 101]
    assert cifar100.CIFAR100(data_dir=tmp_path).class_order(1993)[:6] == [68, 56, 78, 8, 23, 84]
    for cls, tasks in ((imagenet_a.ImageNetA, 10), (cub200.CUB200, 10), (cifar100.CIFAR100, 10),
                       (domainnet.DomainNet, 5)):
        assert cls.default_tasks == tasks and cls.default_seeds == (1993,)
        assert cls.default_backbone == "vit-b16-in21k-ft-in1k"
    assert domainnet.DomainNet.task_choices == (3, 5, 15, 23, 69)
    with pytest.raises(UsageError, match="valid choices: 3, 5, 15, 23, 69"):
        domainnet.DomainNet(data_dir=tmp_path).check_tasks(10)
    with pytest.raises(UsageError, match="valid splits: sdlora, coda"):
        imagenet_r.ImageNetR(imagenet_r.ImageNetRConfig(split="random"), data_dir=tmp_path)
    with pytest.raises(UsageError, match="subset of clipart"):
        domainnet.DomainNet(domainnet.DomainNetConfig(domains="real,photos"), data_dir=tmp_path)


def test_transforms_follow_the_official_build_transform():
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR100 as TV

    train, test = datasets.train_transform(224), datasets.test_transform(224)
    crop = train.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.05, 1.0)
    assert isinstance(train.transforms[1], T.RandomHorizontalFlip)
    resize = test.transforms[0]
    assert resize.size == 256 and resize.interpolation == T.InterpolationMode.BICUBIC
    assert test.transforms[1].size == (224, 224)
    assert [type(t) for t in (train.transforms[-1], test.transforms[-1])] == [T.PILToTensor] * 2
    assert cifar100.REMOTES["torchvision"].md5 == TV.tgz_md5
    assert cifar100.REMOTES["torchvision"].url == TV.url


def test_stream_tasks_and_class_order(local_data, tmp_path):
    from clbench.streams import build_stream

    bench = imagenet_a.ImageNetA(data_dir=tmp_path, download=True)
    split = bench.load(16)
    order = bench.class_order(1993)
    stream = build_stream(split, order, 10)
    assert len(stream.train) == len(stream.test) == 10 and stream.classes_per_task == [20] * 10
    first = stream.train[0].dataset
    originals = {split.train.targets[i] for i in range(len(split.train))
                 if order.index(split.train.targets[i]) < 20}
    assert originals == set(order[:20]) and {168, 136, 51, 9, 183, 101} <= originals
    assert len(first) == 20  # one training image per class in the miniature


def test_cli_run_end_to_end(local_data, tmp_path):
    import timm
    from safetensors.torch import save_file

    from clbench.backbones import BACKBONES
    from clbench.cli import main

    spec = BACKBONES["vit-tiny-letters"]
    model = timm.create_model(spec.tag, pretrained=False, num_classes=10, **spec.model_kwargs)
    save_file(model.state_dict(), tmp_path / "letters.safetensors")
    args = ["run", "--methods", "linear-probe", "--bench", "imagenet-r", "--data-dir",
            str(tmp_path / "data"), "--download", "--backbone", "vit-tiny-letters", "--checkpoint",
            str(tmp_path / "letters.safetensors"), "--epochs", "1", "--tasks", "2", "--out",
            str(tmp_path / "runs"), "--name", "e2e", "--no-report"]
    assert main(args) == 0
    results = json.loads((tmp_path / "runs/e2e/imagenet-r-2tasks/linear-probe/seed-1995/"
                          "results.json").read_text())
    assert results["complete"] and len(results["correct"]) == 2
    assert results["split"]["protocol"] == "imagenet-r-sdlora-adam-presplit"
    assert results["split"]["n_train"] == 400 and results["class_order"][:2] == [146, 198]
    assert [sum(t) for t in results["total"]][-1] == 200


# ------------------------------------------------- data the user already has (official layout)

PRESPLIT = {  # id: (class, folder under --data-dir as the official codes read it, class names)
    "imagenet-r": (imagenet_r.ImageNetR, "imagenet-r", fx.wnids(200)),
    "imagenet-a": (imagenet_a.ImageNetA, "imagenet-a", fx.wnids(200)),
    "cub200": (cub200.CUB200, "cub", [f"{i:03d}.Bird_{i}" for i in range(1, 201)]),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""
    def refuse(url, dest):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(downloads, "download_file", refuse)


def _existing(case, tmp_path, monkeypatch, n_train=2, n_test=1):
    """An extracted tree at ``<data>/<name>/{train,test}/<class>/`` and the benchmark expecting
    its total."""
    cls, name, classes = PRESPLIT[case]
    folder = fx.presplit_tree(tmp_path / "data" / name, classes, n_train, n_test)
    key = "sdlora" if cls is imagenet_r.ImageNetR else "adam"
    monkeypatch.setattr(cls, "expected_counts", {**cls.expected_counts,
                                                 key: len(classes) * (n_train + n_test)})
    return cls, folder, key


@pytest.mark.parametrize("case", list(PRESPLIT))
def test_existing_official_tree_is_used_without_download(case, tmp_path, monkeypatch, no_network):
    cls, folder, key = _existing(case, tmp_path, monkeypatch)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    split = cls(data_dir=tmp_path / "data").load(16)
    assert (split.identity["n_train"], split.identity["n_test"]) == (400, 200)
    assert split.train.root == folder / "train" and split.test.root == folder / "test"
    assert set(split.train.targets) == set(split.test.targets) == set(range(200))
    assert split.train[0][0].shape == (3, 16, 16)
    marker = json.loads(marker_path(folder, key).read_text())
    assert marker["split_root"] == "." and marker["hash"] == split.identity["hash"]
    assert (marker["n_train"], marker["n_test"]) == (400, 200)
    assert "existing" in marker["source"]
    after = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    assert after == sorted(before + [marker_path(folder, key).relative_to(folder)])  # untouched
    again = cls(data_dir=tmp_path / "data", download=True).load(24)  # --download: still no fetch
    assert again.identity == split.identity


def test_existing_tree_has_the_identity_of_the_published_archive(local_data, tmp_path,
                                                                 monkeypatch):
    downloaded = imagenet_r.ImageNetR(data_dir=tmp_path / "a", download=True).load(16)
    monkeypatch.setattr(downloads, "download_file", lambda *a: pytest.fail("downloaded"))
    fx.presplit_tree(tmp_path / "b" / "imagenet-r", fx.wnids(200), 2, 1, size=20)
    existing = imagenet_r.ImageNetR(data_dir=tmp_path / "b").load(16)
    assert existing.identity == downloaded.identity
    assert existing.identity["protocol"] == "imagenet-r-sdlora-adam-presplit"


def _drop_one_image(folder):
    next((folder / "train").rglob("*.jpg")).unlink()


def _drop_test(folder):
    shutil.rmtree(folder / "test")


def _rename_test_class(folder):
    first = sorted((folder / "test").iterdir())[0]
    first.rename(first.with_name("n99999999"))


def _empty_class(folder):
    for image in sorted((folder / "test").iterdir())[0].iterdir():
        image.unlink()


@pytest.mark.parametrize("break_it, expected", [
    (_drop_one_image, r"train/ and test/ hold 599 images, expected 600 \(the published "
                      r"imagenet-r.zip split\); replace it with the published extracted tree, or "
                      r"move it away and rerun with --download"),
    (_drop_test, r"has train/ but no test/: the official layout is .*/test/<class>/…; add it"),
    (_rename_test_class, r"expected the same 200 class folders in train/ and test/, found 200 and "
                         r"200 \(e.g. 'n01000000' is in only one of them\)"),
    (_empty_class, r"Found no valid file for the classes n01000000"),
])
@pytest.mark.parametrize("download", [False, True])
def test_existing_tree_that_is_not_the_published_split_is_refused(
        break_it, expected, download, tmp_path, monkeypatch, no_network):
    cls, folder, key = _existing("imagenet-r", tmp_path, monkeypatch)
    break_it(folder)
    before = sorted(folder.rglob("*"))
    with pytest.raises(UsageError, match=expected) as info:
        cls(data_dir=tmp_path / "data", download=download).load(16)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(folder))
    assert not marker_path(folder, key).exists() and sorted(folder.rglob("*")) == before


def test_tree_changed_after_verification_is_refused(tmp_path, monkeypatch, no_network):
    cls, folder, key = _existing("imagenet-a", tmp_path, monkeypatch)
    cls(data_dir=tmp_path / "data").load(16)
    fx.write_jpeg(folder / "train" / fx.wnids(200)[3] / "extra.jpg", 12, seed=0)
    with pytest.raises(UsageError) as info:
        cls(data_dir=tmp_path / "data").load(16)
    assert str(info.value) == (
        f"{folder}: the images changed since the folder was verified (401 train / 200 test now, "
        f"400 / 200 then); restore them, or delete {marker_path(folder, key)} to verify the "
        "folder again")


def test_read_only_existing_tree_is_verified_every_time(tmp_path, monkeypatch, no_network):
    cls, folder, key = _existing("cub200", tmp_path, monkeypatch)

    def read_only(*args):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(presplit, "write_marker", read_only)
    assert cls(data_dir=tmp_path / "data").load(16).identity["n_train"] == 400
    assert not marker_path(folder, key).exists()
    _drop_one_image(folder)
    with pytest.raises(UsageError, match="hold 599 images, expected 600"):
        cls(data_dir=tmp_path / "data").load(16)


@pytest.mark.parametrize("case", list(PRESPLIT))
def test_missing_presplit_data_says_where_an_existing_copy_goes(case, tmp_path):
    cls, name, _ = PRESPLIT[case]
    with pytest.raises(UsageError) as info:
        cls(data_dir=tmp_path).load(16)
    folder = tmp_path / name
    assert str(info.value) == (
        f"{cls.registered_name} data not found in {folder}; if you already have it extracted, "
        f"put it at {folder}/train/<class>/… and {folder}/test/<class>/… (the official layout), "
        f"else download it with: clbench run --bench {cls.registered_name} --download "
        f"--data-dir {tmp_path}")


# ------------------------------------------------------------------------ task-count checks

def test_one_class_per_task_and_non_positive_tasks_are_refused(tmp_path):
    from clbench.benchmarks.digits import Digits

    digits = Digits(data_dir=tmp_path)
    for ok in (2, 5):
        digits.check_tasks(ok)
    with pytest.raises(UsageError) as info:
        digits.check_tasks(10)
    assert str(info.value) == ("digits has 10 classes: --tasks 10 leaves a task with a single "
                               "class, where the current-task cross-entropy is identically 0 and "
                               "nothing trains; valid choices: 2, 5")
    for bad in (0, -1, -10):
        with pytest.raises(UsageError, match=rf"^--tasks must be a positive integer, got {bad}; "
                                             r"valid choices for digits: 2, 5$"):
            digits.check_tasks(bad)
    with pytest.raises(UsageError, match="does not split them evenly; valid choices: 2, 5$"):
        digits.check_tasks(3)


def test_a_listed_one_class_split_is_refused_too(tmp_path):
    from clbench.benchmark import Benchmark

    class Fifteen(Benchmark):  # a plugin listing a split with single-class tasks
        registered_name = "fifteen"
        n_classes = 15
        task_choices = (3, 5, 10, 15)

    with pytest.raises(UsageError, match="--tasks 10 leaves a task with a single class.*"
                                         "valid choices: 3, 5$"):
        Fifteen(data_dir=tmp_path).check_tasks(10)
    Fifteen(data_dir=tmp_path).check_tasks(5)


def test_every_listed_task_choice_trains(tmp_path):
    from clbench.registry import BENCHMARKS

    for name in BENCHMARKS.builtin_names():
        cls = BENCHMARKS.get(name)
        assert cls.default_tasks in cls.task_choices, name
        for n_tasks in cls.task_choices:
            assert cls.n_classes // n_tasks >= 2, (name, n_tasks)


@pytest.mark.slow  # imports the CLI and every method
def test_cli_refuses_a_one_class_split_before_anything_runs(tmp_path, capsys):
    from clbench.cli import main

    code = main(["run", "--methods", "finetune", "--bench", "digits", "--tasks", "10", "--out",
                 str(tmp_path / "runs"), "--name", "one-class", "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "identically 0" in err
    assert not (tmp_path / "runs" / "one-class" / "digits-10tasks").exists()


def _own_coda_tree(local_data, folder, with_lists: bool):
    """The authors' images where CODA-Prompt reads them (``<data>/imagenet-r/<wnid>/``), made
    like the served ``imagenet-r.tar``; optionally with CODA's two lists put there by hand."""
    fx.image_tree(folder, fx.wnids(200), 3, 12, seed=3, stem="art")
    if with_lists:
        for split in ("train", "test"):
            name = f"imagenet-r_{split}.yaml"
            shutil.copy(local_data["files"][name], folder / name)


def test_own_coda_layout_is_used_in_place(local_data, tmp_path, monkeypatch):
    coda = imagenet_r.ImageNetRConfig(split="coda")
    downloaded = imagenet_r.ImageNetR(coda, data_dir=tmp_path / "a", download=True).load(16)
    monkeypatch.setattr(downloads, "download_file", lambda *a: pytest.fail("downloaded"))
    folder = tmp_path / "b" / "imagenet-r"
    _own_coda_tree(local_data, folder, with_lists=True)
    split = imagenet_r.ImageNetR(coda, data_dir=tmp_path / "b").load(16)
    assert split.identity == downloaded.identity
    assert split.train.root == tmp_path / "b" and split.train[0][0].shape == (3, 16, 16)
    marker = json.loads(marker_path(folder, "coda").read_text())
    assert marker["images"] == ".." and "CODA-Prompt layout" in marker["source"]
    assert not (folder / "original").exists()
    fx.write_jpeg(folder / "n00000001" / "new.jpg", 12, seed=0)  # shifts every class id
    with pytest.raises(UsageError, match="the CODA-Prompt lists or the class folders changed"):
        imagenet_r.ImageNetR(coda, data_dir=tmp_path / "b").load(16)


def test_own_coda_layout_without_lists(local_data, tmp_path):
    coda = imagenet_r.ImageNetRConfig(split="coda")
    folder = tmp_path / "imagenet-r"
    _own_coda_tree(local_data, folder, with_lists=False)
    with pytest.raises(UsageError) as info:
        imagenet_r.ImageNetR(coda, data_dir=tmp_path).load(16)
    assert str(info.value) == (
        f"{folder} holds ImageNet-R images but not CODA-Prompt's imagenet-r_train.yaml: rerun "
        f"with --download (fetches only the two lists), or put it at "
        f"{folder / 'imagenet-r_train.yaml'}")
    split = imagenet_r.ImageNetR(coda, data_dir=tmp_path, download=True).load(16)
    assert split.identity["n_train"] == 400
    assert not (folder / "imagenet-r.tar").exists() and not (folder / "original").exists()
    (next(folder.glob("n*")) / "art_0.jpg").unlink()
    marker_path(folder, "coda").unlink()
    with pytest.raises(UsageError, match=r"found 599 images, expected 600 \(the authors' "
                                         r"imagenet-r.tar\); replace it"):
        imagenet_r.ImageNetR(coda, data_dir=tmp_path).load(16)
