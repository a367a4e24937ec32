"""The decoded-image cache serves bit-identical samples (same transforms, same random state)."""
from __future__ import annotations

import torch

from clbench.benchmark import SplitData
from clbench.datasets import ImageFiles, train_transform
from clbench.datasets import test_transform as eval_transform
from clbench.decoded_cache import DecodedImages, attach, build, fixed_uint8
from fixtures_data import image_tree


def _files(tmp_path, size):
    names = image_tree(tmp_path / "imgs", ["a", "b", "c"], 4, size, seed=7)
    names.append(names.pop(0))  # not in folder order: offsets must follow the list
    return names


def test_cached_items_equal_the_jpeg_path_for_train_and_test_transforms(tmp_path):
    names = _files(tmp_path, 40)
    targets = [i % 3 for i in range(len(names))]
    for transform in (train_transform(16), eval_transform(16)):
        files = ImageFiles(tmp_path / "imgs", names, targets, transform)
        cached = DecodedImages(files, build(files, tmp_path / "cache", processes=2))
        for i in range(len(files)):
            torch.manual_seed(i)
            expected, label = files[i]
            torch.manual_seed(i)
            got, cached_label = cached[i]
            assert torch.equal(got, expected) and label == cached_label


def test_cache_is_built_once_and_attach_replaces_image_parts(tmp_path):
    names = _files(tmp_path, 24)
    files = ImageFiles(tmp_path / "imgs", names, [0] * len(names), eval_transform(16))
    first = build(files, tmp_path / "cache", processes=1)
    stamp = (first / "pixels.u8").stat().st_mtime_ns
    assert build(files, tmp_path / "cache", processes=1) == first
    assert (first / "pixels.u8").stat().st_mtime_ns == stamp
    assert (first / "pixels.u8").stat().st_size == len(names) * 24 * 24 * 3
    split = attach(SplitData(files, files, {}), tmp_path / "cache", 1, log=lambda *a: None)
    assert isinstance(split.train, DecodedImages) and isinstance(split.test, DecodedImages)
    loader = torch.utils.data.DataLoader(split.test, batch_size=5, num_workers=2)  # pickles lazily
    assert sum(len(b[1]) for b in loader) == len(names)


def test_run_flag_on_a_benchmark_without_files_is_a_no_op(cli, tmp_path, tiny_checkpoint):
    code, out, err = cli("run", "--methods", "linear-probe", "--tasks", "2", "--epochs", "1",
                         "--decoded-cache", "--checkpoint", tiny_checkpoint, "--out", tmp_path,
                         "--name", "d", "--no-report")
    assert code == 0, err
    assert "already decoded in memory" in out


def test_a_fixed_transform_is_stored_applied_and_gives_the_same_items(tmp_path):
    names = _files(tmp_path, 40)
    targets = [i % 3 for i in range(len(names))]
    test = ImageFiles(tmp_path / "imgs", names, targets, eval_transform(16))
    train = ImageFiles(tmp_path / "imgs", names, targets, train_transform(16))
    assert fixed_uint8(test.transform) and not fixed_uint8(train.transform)
    split = attach(SplitData(train, test, {}), tmp_path / "cache", 2, log=lambda *a: None)
    assert split.test.transformed and not split.train.transformed
    stored = split.test.pixels_file.stat().st_size
    assert stored == len(names) * 3 * 16 * 16  # the 16-px crops, not the 40-px images
    for i in range(len(names)):
        expected, label = test[i]
        got, cached_label = split.test[i]
        assert got.dtype == torch.uint8 and torch.equal(got, expected) and label == cached_label


def test_the_statistics_view_is_cached_after_the_test_transform(tmp_path):
    """Class statistics read the training images under the test transform: stored applied, once."""
    names = _files(tmp_path, 40)
    targets = [i % 3 for i in range(len(names))]
    train = ImageFiles(tmp_path / "imgs", names, targets, train_transform(16))
    test = ImageFiles(tmp_path / "imgs", names[:3], targets[:3], eval_transform(16))
    split = attach(SplitData(train, test, {}), tmp_path / "cache", 2, log=lambda *a: None)
    assert isinstance(split.statistics, DecodedImages) and split.statistics.transformed
    reference = ImageFiles(tmp_path / "imgs", names, targets, eval_transform(16))
    for i in range(len(names)):
        assert torch.equal(split.statistics[i][0], reference[i][0])
