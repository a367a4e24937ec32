"""Turn a benchmark's split into an Avalanche class-incremental scenario."""
from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


class Relabeled(Dataset):
    """A view of a dataset whose labels are positions in the class order."""

    def __init__(self, dataset, class_order: list[int]):
        self.dataset = dataset
        position = {c: i for i, c in enumerate(class_order)}
        self.targets = [position[int(t)] for t in dataset.targets]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, _ = self.dataset[index]
        return x, self.targets[index]


@dataclass
class Stream:
    scenario: object  # avalanche CLScenario
    class_order: list[int]
    classes_per_task: list[int]

    @property
    def train(self):
        return self.scenario.train_stream

    @property
    def test(self):
        return self.scenario.test_stream

    @property
    def statistics(self):
        """Experience ``k`` holds the same images, in the same order, as ``train[k]``, under the
        test transform (``SplitData.statistics``)."""
        return self.scenario.statistics_stream


def build_stream(split, class_order: list[int], n_tasks: int) -> Stream:
    from avalanche.benchmarks import class_incremental_benchmark

    n_classes = len(class_order)
    scenario = class_incremental_benchmark(
        {"train": Relabeled(split.train, class_order), "test": Relabeled(split.test, class_order),
         "statistics": Relabeled(split.statistics, class_order)},
        class_order=list(range(n_classes)), num_experiences=n_tasks)
    per_task = [len(exp.classes_in_this_experience) for exp in scenario.train_stream]
    return Stream(scenario, class_order, per_task)
