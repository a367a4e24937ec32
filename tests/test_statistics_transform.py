"""Class statistics come from the task's training images under the *test* transform, in a pass
of their own, as the official codes compute them; every method's statistics are checked against
a direct computation over those images, and the augmented ablation is checked to differ."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from clbench.adapters import merged
from clbench.benchmark import SplitData
from clbench.methods.prototype.aper import APER
from clbench.methods.prototype.ease import EASE
from clbench.methods.prompt.hide_prompt import HiDePrompt
from clbench.methods.lora.inflora.ca import InfLoRACA
from clbench.methods.prototype.ranpac import RanPAC
from clbench.methods.prototype.simplecil import SimpleCIL
from clbench.methods.prompt import query_features
from clbench.streams import build_stream
from helpers import build, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def augment(x):
    """A random crop-like perturbation and flip: different at every call."""
    x = x * 0.9 + 0.3 * torch.rand_like(x)
    return x.flip(-1) if torch.rand(()) < 0.5 else x


def fixed(x):
    """A deterministic transform that still changes the pixels (so raw images would not pass)."""
    return x * 0.8 + 0.05


class Augmented(Dataset):
    """Images with a ``transform`` attribute, as image-file datasets have."""

    def __init__(self, x, y, transform):
        self.x, self.targets, self.transform = x, y.tolist(), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.targets[i]


def augmented_stream(n_classes=4, n_tasks=2, per_class=6):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = torch.rand(len(y), 3, 16, 16, generator=g) * 0.5 + (y.float() / n_classes).view(-1, 1, 1, 1)
    split = SplitData(Augmented(x, y, augment), Augmented(x[::3], y[::3], fixed), {})
    return build_stream(split, list(range(n_classes)), n_tasks), x, y


def test_statistics_view_is_the_training_images_under_the_test_transform():
    stream, x, y = augmented_stream()
    assert stream.statistics[0].dataset is not stream.train[0].dataset
    for task in range(2):
        train, stats = stream.train[task].dataset, stream.statistics[task].dataset
        assert [train[i][1] for i in range(len(train))] == [stats[i][1] for i in range(len(stats))]
        expected = fixed(x[torch.isin(y, torch.tensor([2 * task, 2 * task + 1]))])
        got = torch.stack([stats[i][0] for i in range(len(stats))])
        assert torch.equal(got.sort(0).values, expected.sort(0).values)


def test_data_without_a_transform_is_its_own_statistics_view():
    plain = Augmented(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), augment)
    del plain.transform
    assert SplitData(plain, plain).statistics is plain


def direct(features_of, stream, task, x, y):
    """Features of the task's training images under the test transform, and their labels."""
    classes = sorted(stream.train[task].classes_in_this_experience)
    keep = torch.isin(y, torch.tensor(classes))
    with torch.no_grad():
        return features_of(fixed(x[keep])).double(), y[keep]


def class_means(features, labels, classes):
    return torch.stack([features[labels == c].mean(0) for c in classes])


def train_tasks(strategy, stream, n_tasks=2):
    for task in range(n_tasks):
        strategy.train(stream.train[task], statistics=stream.statistics[task])


def test_simplecil_prototypes_are_means_of_test_transformed_features():
    stream, x, y = augmented_stream()
    strategy = build(SimpleCIL, tiny_vit(), n_tasks=2, batch_size=5, eval_batch_size=7)
    train_tasks(strategy, stream)
    f = [direct(strategy.model.features, stream, t, x, y) for t in range(2)]
    expected = torch.cat([class_means(*f[0], [0, 1]), class_means(*f[1], [2, 3])])
    torch.testing.assert_close(strategy.prototypes(), expected, rtol=1e-6, atol=1e-6)

    ablation = build(SimpleCIL, tiny_vit(), n_tasks=2, batch_size=5, stats_transform="train")
    train_tasks(ablation, stream)
    assert (ablation.prototypes() - expected).abs().max() > 1e-3  # the augmented loader differs


def test_simplecil_prototypes_do_not_depend_on_the_seed():
    """Before, prototypes averaged one draw of the augmentation, seeded by the run seed."""
    stream, *_ = augmented_stream()
    prototypes = []
    for seed in (0, 1):
        strategy = build(SimpleCIL, tiny_vit(), n_tasks=2)
        strategy.seed = seed
        torch.manual_seed(seed)
        train_tasks(strategy, stream)
        prototypes.append(strategy.prototypes())
    assert torch.equal(*prototypes)


def test_aper_prototypes_are_means_of_both_paths_on_test_transformed_images():
    stream, x, y = augmented_stream()
    strategy = build(APER, tiny_vit(), n_tasks=2, epochs=1, batch_size=6, ffn_num=4)
    train_tasks(strategy, stream)
    strategy.model.eval()
    f = [direct(strategy.features_for_prototypes, stream, t, x, y) for t in range(2)]
    expected = torch.cat([class_means(*f[0], [0, 1]), class_means(*f[1], [2, 3])])
    torch.testing.assert_close(strategy.prototypes(), expected, rtol=1e-5, atol=1e-5)


def test_ease_subspace_prototypes_are_means_of_test_transformed_features():
    stream, x, y = augmented_stream()
    strategy = build(EASE, tiny_vit(), n_tasks=2, epochs=1, batch_size=6, ffn_num=4)
    train_tasks(strategy, stream)
    strategy.model.eval()
    for s, statistics in enumerate(strategy.subspace_statistics):
        features_of = lambda images, s=s: strategy.subspace_features(images, s)  # noqa: E731
        for task in range(s, 2):
            classes = [2 * task, 2 * task + 1]
            expected = class_means(*direct(features_of, stream, task, x, y), classes)
            torch.testing.assert_close(statistics.means()[classes], expected, rtol=1e-5, atol=1e-5)


def test_ranpac_gram_and_targets_are_sums_over_test_transformed_images():
    stream, x, y = augmented_stream()
    strategy = build(RanPAC, tiny_vit(), n_tasks=2, epochs=1, batch_size=6, ffn_num=4, rp_dim=16)
    train_tasks(strategy, stream)
    strategy.model.eval()
    h = torch.cat([direct(lambda i: strategy.projected(strategy.model.features(i)), stream, t, x, y)[0]
                   for t in range(2)])
    labels = torch.cat([direct(strategy.model.features, stream, t, x, y)[1] for t in range(2)])
    torch.testing.assert_close(strategy.gram.cpu(), h.T @ h, rtol=1e-6, atol=1e-6)
    sums = torch.stack([h[labels == c].sum(0) for c in range(4)])
    torch.testing.assert_close(strategy.targets.sum[:4], sums, rtol=1e-6, atol=1e-6)


def test_inflora_ca_gaussians_are_test_transformed_class_statistics():
    stream, x, y = augmented_stream()
    strategy = build(InfLoRACA, tiny_vit(), n_tasks=2, epochs=1, batch_size=6, ca_epochs=1)

    def features_of(images):
        with merged(strategy.model):
            return strategy.model.features(images)

    for task in range(2):
        strategy.train(stream.train[task], statistics=stream.statistics[task])
        strategy.model.eval()
        f, labels = direct(features_of, stream, task, x, y)
        for c in (2 * task, 2 * task + 1):
            torch.testing.assert_close(strategy.gaussians.means[c], f[labels == c].mean(0),
                                       rtol=1e-5, atol=1e-5)
            cov = torch.cov(f[labels == c].T) + strategy.config.cov_ridge * torch.eye(f.shape[1])
            torch.testing.assert_close(strategy.gaussians.covs[c], cov.float(), rtol=1e-4, atol=1e-5)


def test_hide_prompt_statistics_are_test_transformed_class_statistics():
    stream, x, y = augmented_stream()
    strategy = build(HiDePrompt, tiny_vit(dim=24, depth=5), n_tasks=2, epochs=1, batch_size=6,
                     prompt_length=2, tap_epochs=1, tii_epochs=1)
    strategy.train(stream.train[0], statistics=stream.statistics[0])
    strategy.model.eval()
    model = strategy.model
    uninstructed = lambda i: query_features(model.backbone, model.normalize(i))  # noqa: E731
    instructed = lambda i: strategy.prompted_features(i, model.prompt[:, 0])  # noqa: E731
    for statistics, features_of in ((strategy.uninstructed, uninstructed),
                                    (strategy.instructed, instructed)):
        f, labels = direct(features_of, stream, 0, x, y)
        torch.testing.assert_close(statistics.means()[:2], class_means(f, labels, [0, 1]),
                                   rtol=1e-5, atol=1e-5)
        covariances = torch.stack([torch.cov(f[labels == c].T) for c in (0, 1)])
        torch.testing.assert_close(statistics.covariances()[:2], covariances, rtol=1e-5, atol=1e-6)


def test_unknown_statistics_transform_is_a_usage_error():
    from clbench.errors import UsageError

    with pytest.raises(UsageError, match="stats_transform"):
        SimpleCIL.Config(stats_transform="augmented")


@pytest.mark.slow
def test_simplecil_final_accuracy_is_the_same_for_any_seed_on_augmented_jpegs(cli, tmp_path):
    """On a JPEG benchmark with random crops and flips: prototypes, hence the final accuracy over
    all classes, no longer depend on the seed's augmentation draws (the class order aside, which
    the final accuracy does not see); the decoded cache serves the same statistics."""
    from clbench.perf import jpeg_tree

    jpeg_tree.generate(tmp_path / "data", jpeg_tree.TreeSpec(
        classes=4, train_per_class=8, test_per_class=4, side=40), processes=1)

    def final(name, *extra):
        code, _, err = cli("run", "--plugin", "clbench.perf.synthetic_bench", "--bench",
                           "imagenet-r-synthetic", "--data-dir", tmp_path / "data", "--tasks", "2",
                           "--methods", "simplecil", "--backbone", "vit-tiny-letters", "--out",
                           tmp_path / "runs", "--name", name, "--no-report", *extra)
        assert code == 0, err
        [path] = (tmp_path / "runs" / name).rglob("results.json")
        result = json.loads(path.read_text())
        return sum(result["correct"][-1]), sum(result["total"][-1])

    a, b = final("a", "--seeds", "1"), final("b", "--seeds", "2")
    assert a == b
    assert final("c", "--seeds", "1", "--decoded-cache", "--workers", "2") == a


def test_the_statistics_pass_leaves_the_runs_random_stream_alone():
    """Methods sample after their statistics (InfLoRA-CA's Gaussians): a statistics pass must
    not draw from the global generator (a DataLoader iterator draws its base seed)."""
    stream, *_ = augmented_stream()
    strategy = build(SimpleCIL, tiny_vit(), n_tasks=2)
    strategy.statistics_experience = stream.statistics[0]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for _ in range(2):
        assert sum(len(batch[1]) for batch in strategy.statistics_loader()) == 12
    assert torch.equal(torch.get_rng_state(), before)
