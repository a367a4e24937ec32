"""Class order convention and the Avalanche stream built from a split."""
import numpy as np
import torch

from clbench.benchmark import Benchmark, SplitData
from clbench.streams import build_stream


class _Images(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.targets = list(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(self.targets[i])), self.targets[i]


class _Toy(Benchmark):
    registered_name = "toy"
    n_classes = 200


def test_class_order_follows_the_seed_paper_convention():
    assert _Toy().class_order(1993)[:6] == [168, 136, 51, 9, 183, 101]
    assert _Toy().class_order(1995)[:6] == [146, 198, 169, 126, 142, 183]


def test_tasks_hold_consecutive_positions_of_the_class_order():
    labels = [c for c in range(6) for _ in range(3)]
    split = SplitData(_Images(labels), _Images(labels))
    order = [4, 0, 5, 2, 1, 3]
    stream = build_stream(split, order, n_tasks=3)
    assert stream.classes_per_task == [2, 2, 2]
    for k, experience in enumerate(stream.train):
        assert sorted(experience.classes_in_this_experience) == [2 * k, 2 * k + 1]
        xs = {int(experience.dataset[i][0][0, 0, 0]) for i in range(len(experience.dataset))}
        # the images of task k are those of original classes order[2k], order[2k+1]
        assert xs == {order[2 * k], order[2 * k + 1]}
    np.testing.assert_equal(len(stream.test[0].dataset), 6)
