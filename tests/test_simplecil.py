"""SimpleCIL: class-mean prototypes of frozen features, nearest-prototype cosine rule, no training."""
import json

import pytest
import torch
from torch.nn import functional as F

from clbench.methods.prototype.simplecil import SimpleCIL
from helpers import build, tensor_stream, tiny_vit


def features_and_labels(model, experience):
    x = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
    y = torch.tensor([experience.dataset[i][1] for i in range(len(experience.dataset))])
    with torch.no_grad():
        return model.features(x), y


def test_prototypes_are_class_means_and_prediction_is_nearest_cosine():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=5)
    strategy = build(SimpleCIL, tiny_vit(), n_tasks=2, batch_size=3)
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    feats, labels = [], []
    for task in range(2):
        strategy.train(stream.train[task])
        f, y = features_and_labels(strategy.model, stream.train[task])
        feats.append(f)
        labels.append(y)
        assert strategy.trainable_parameter_count() == 0
        assert strategy.train_epochs == 0
    feats, labels = torch.cat(feats), torch.cat(labels)
    means = torch.stack([feats[labels == c].double().mean(0) for c in range(4)])
    assert torch.allclose(strategy.prototypes(), means, atol=1e-5)

    # no parameter (or buffer) changed across the two tasks, head included
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))

    test = torch.stack([stream.test[t].dataset[i][0] for t in range(2)
                        for i in range(len(stream.test[t].dataset))])
    strategy.model.eval()
    logits = strategy.predict(test)
    with torch.no_grad():
        f = strategy.model.features(test)
    expected = (F.normalize(f, dim=1) @ F.normalize(means.float(), dim=1).T).argmax(1)
    assert torch.equal(logits.argmax(1), expected)
    assert logits.shape == (len(test), 4)


def test_resume_restores_prototypes():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    first = build(SimpleCIL, tiny_vit(), n_tasks=2)
    first.train(stream.train[0])
    second = build(SimpleCIL, tiny_vit(), n_tasks=2)
    second.load_checkpoint(first.checkpoint())
    for strategy in (first, second):
        strategy.train(stream.train[1])
    assert torch.equal(first.prototypes(), second.prototypes())


@pytest.mark.slow
def test_lamda_family_runs_on_digits_through_the_cli(tmp_path):
    """SimpleCIL, APER, RanPAC and EASE end to end on the default job (2 epochs per trained task)."""
    from clbench.cli import main

    code = main(["run", "--methods", "simplecil,aper,ranpac,ease", "--out", str(tmp_path),
                 "--no-report", "--seeds", "1993", "--epochs", "2"])
    assert code in (0, None)
    results = {p.parts[-3]: json.loads(p.read_text()) for p in tmp_path.rglob("results.json")}
    assert set(results) == {"simplecil", "aper", "ranpac", "ease"}
    for method, data in results.items():
        status = data.get("status", "complete" if data.get("complete") else "running")
        assert status == "complete", method
        assert len(data["correct"]) == 5 and "forgetting" in data["metrics"], method
        assert data["metrics"]["final_acc"] > 50, method
    assert results["simplecil"]["trainable_params"] == [0] * 5
    for method in ("aper", "ranpac"):  # adapters + head on the first task, nothing afterwards
        params = results[method]["trainable_params"]
        assert params[0] > 0 and params[1:] == [0] * 4
        # only a task with gradient steps has a first step to time
        assert ["to_first_step" in s for s in results[method]["seconds_per_task"]] == [True] + [False] * 4
    assert not any("to_first_step" in s for s in results["simplecil"]["seconds_per_task"])
    assert all(p > 0 for p in results["ease"]["trainable_params"])
    passes = [results[m]["forward_passes_per_image"] for m in ("simplecil", "aper", "ranpac", "ease")]
    assert passes == [1, 2, 1, 5]
