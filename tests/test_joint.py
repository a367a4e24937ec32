"""The joint upper bound trains on every task seen so far, with the loss over all seen classes."""
import copy

import torch
from avalanche.core import SupervisedPlugin

from clbench.backbones import load_backbone
from clbench.model import CLModel
from clbench.registry import BENCHMARKS, METHODS
from clbench.streams import build_stream


class LabelSpy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.labels = []

    def after_training_iteration(self, strategy, **kwargs):
        self.labels.append(strategy.mb_y.clone())


def test_joint_trains_on_the_union_with_all_seen_logits(tiny_checkpoint):
    torch.manual_seed(0)
    bench = BENCHMARKS.get("digits")()
    stream = build_stream(bench.load(16), bench.class_order(1993), 5)
    loaded = load_backbone("vit-tiny-letters", tiny_checkpoint)
    model = CLModel(copy.deepcopy(loaded.model), loaded.feature_dim, loaded.spec.mean, loaded.spec.std)
    joint = METHODS.get("joint")
    strategy = joint(model=model, config=joint.Config(epochs=1, train_backbone=False))
    strategy.train(stream.train[0])
    old_rows = model.head.fc.weight[:2].detach().clone()

    spy = LabelSpy()
    strategy.plugins.append(spy)
    strategy.train(stream.train[1])
    labels = torch.cat(spy.labels)
    assert len(labels) == len(stream.train[0].dataset) + len(stream.train[1].dataset)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    # the loss covers the first task's classes too, so their head rows keep training
    assert not torch.equal(model.head.fc.weight[:2], old_rows)
