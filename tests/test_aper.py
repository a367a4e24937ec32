"""APER: parallel adapters (parity with the official block), first-task-only tuning, features
concatenating the pretrained and the adapted path."""
import copy

import torch
from torch.nn import functional as F

from clbench.methods.prototype import parallel_adapter
from clbench.methods.prototype.aper import APER
from helpers import build, tensor_stream, tiny_vit


def reference_block(block, adapter, x):
    """The official AdaptFormer block (ffn_option='parallel', no adapter LayerNorm)."""
    x = x + block.attn(block.norm1(x))
    adapt = adapter.up(F.relu(adapter.down(x))) * adapter.scale
    return x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(x)))) + adapt


def test_parallel_adapter_matches_the_official_block_and_starts_as_identity():
    vit = tiny_vit()
    plain = copy.deepcopy(vit)
    wrappers = parallel_adapter.install(vit)
    parallel_adapter.add_adapters(wrappers, bottleneck=4)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vit(x), plain(x), atol=1e-6)  # "lora" init: up = 0
        for w in wrappers:
            torch.nn.init.normal_(w.adapters[0].up.weight)
        tokens = torch.randn(2, 17, vit.embed_dim)
        expected = reference_block(plain.blocks[0], wrappers[0].adapters[0].eval(), tokens)
        assert torch.allclose(vit.blocks[0](tokens), expected, atol=1e-5)
        with parallel_adapter.using(wrappers, None):
            assert torch.allclose(vit(x), plain(x), atol=1e-6)
        assert not torch.allclose(vit(x), plain(x), atol=1e-4)
    # wrapping moved the pretrained modules, it added only the adapters' parameters
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in plain.parameters()) + \
        sum(p.numel() for w in wrappers for p in w.adapters.parameters())


def test_adapter_trains_on_the_first_task_only_and_features_concatenate_both_paths():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    vit = tiny_vit()
    plain = copy.deepcopy(vit)
    strategy = build(APER, vit, n_tasks=2, epochs=2, lr=0.05, batch_size=4, ffn_num=4)
    init = [p.detach().clone() for p in parallel_adapter.adapter_parameters(strategy.adapters, 0)]

    strategy.train(stream.train[0])
    assert strategy.trainable_parameter_count() > 0
    # official first-session recipe: SGD momentum 0.9 + weight decay, cosine annealing to min_lr
    group = strategy.optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    assert isinstance(strategy.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert strategy.scheduler.T_max == 2 and abs(group["lr"]) < 1e-12  # annealed to 0 after 2 epochs
    tuned = [p.detach().clone() for p in parallel_adapter.adapter_parameters(strategy.adapters, 0)]
    assert any(not torch.equal(a, b) for a, b in zip(init, tuned))

    strategy.train(stream.train[1])
    assert strategy.train_epochs == 0 and strategy.trainable_parameter_count() == 0
    after = parallel_adapter.adapter_parameters(strategy.adapters, 0)
    assert all(torch.equal(a, b) for a, b in zip(tuned, after))

    x = torch.stack([stream.test[0].dataset[i][0] for i in range(4)])
    strategy.model.eval()
    with torch.no_grad():
        feats = strategy.features(x)
        d = vit.num_features
        assert feats.shape == (4, 2 * d)
        assert torch.allclose(feats[:, :d], plain(x), atol=1e-5)
        assert torch.allclose(feats[:, d:], strategy.model.features(x), atol=1e-5)  # adapter on
        assert not torch.allclose(feats[:, d:], feats[:, :d], atol=1e-4)
        assert strategy.prototypes().shape == (4, 2 * d)
        prototypes = F.normalize(strategy.prototypes().float(), dim=1)
        assert torch.equal(strategy.predict(x).argmax(1),
                           (F.normalize(feats, dim=1) @ prototypes.T).argmax(1))


def test_prototypes_are_means_of_concatenated_features_and_resume_matches():
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=4)
    first = build(APER, tiny_vit(), n_tasks=2, epochs=1, batch_size=4, ffn_num=4)
    first.train(stream.train[0])
    second = build(APER, tiny_vit(), n_tasks=2, epochs=1, batch_size=4, ffn_num=4)
    second.load_checkpoint(first.checkpoint())
    for strategy in (first, second):
        strategy.train(stream.train[1])
    assert torch.equal(first.prototypes(), second.prototypes())

    data = stream.train[1].dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    first.model.eval()
    with torch.no_grad():
        feats = first.features(x).double()
    for c in (2, 3):
        assert torch.allclose(first.prototypes()[c], feats[y == c].mean(0), atol=1e-5)


def reference_ssf_vit(plain, ssf, x):
    """The official SSF ViT forward (``vision_transformer_ssf.py``) from plain weights + γ, β."""
    scales = iter([(w.scale, w.shift) for w in ssf])

    def ada(t):
        scale, shift = next(scales)
        return t * scale + shift

    t = ada(plain.patch_embed.proj(x).flatten(2).transpose(1, 2))
    t = torch.cat([plain.cls_token.expand(len(t), -1, -1), t], dim=1) + plain.pos_embed
    for block in plain.blocks:
        attn = block.attn
        b, n, c = t.shape
        qkv = ada(attn.qkv(ada(block.norm1(t)))).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        t = t + ada(attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c)))
        mlp = block.mlp
        t = t + ada(mlp.fc2(mlp.act(ada(mlp.fc1(ada(block.norm2(t)))))))
    return ada(plain.norm(t))[:, 0]


def test_ssf_matches_the_official_ssf_vit_and_switches_off():
    from clbench.methods.prototype import ssf as aper_ssf

    vit = tiny_vit()
    plain = copy.deepcopy(vit)
    ssf = aper_ssf.install(vit)
    assert len(ssf) == 2 + 6 * len(vit.blocks)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vit(x), reference_ssf_vit(plain, ssf, x), atol=1e-5)
        with aper_ssf.disabled(ssf):
            assert torch.allclose(vit(x), plain(x), atol=1e-6)


def test_aper_with_ssf_tunes_only_scales_and_shifts_on_the_first_task():
    from clbench.methods.prototype.ranpac import RanPAC

    assert APER.defaults_for("imagenet-r", 5, peft="ssf")["lr"] == 0.01  # exps/aper_ssf
    assert RanPAC.defaults_for("imagenet-r", 5)["peft"] == "ssf"  # args/imagenetr_publish.csv
    stream = tensor_stream(n_classes=4, n_tasks=2, train_per_class=6)
    vit = tiny_vit()
    plain = copy.deepcopy(vit)
    strategy = build(APER, vit, n_tasks=2, epochs=2, lr=0.05, batch_size=4, peft="ssf")
    assert not strategy.adapters
    before = [p.clone() for p in strategy.tuned_parameters()]
    strategy.train(stream.train[0])
    tuned = strategy.tuned_parameters()
    d = vit.num_features
    assert strategy.trainable_parameter_count() == sum(p.numel() for p in tuned) + 2 * d + 1
    assert any(not torch.equal(a, b) for a, b in zip(before, tuned))
    strategy.train(stream.train[1])
    assert strategy.trainable_parameter_count() == 0 and not any(p.requires_grad for p in tuned)
    x = torch.stack([stream.test[0].dataset[i][0] for i in range(4)])
    strategy.model.eval()
    with torch.no_grad():
        feats = strategy.features(x)
        assert torch.allclose(feats[:, :d], plain(x), atol=1e-5)
        assert not torch.allclose(feats[:, d:], feats[:, :d], atol=1e-4)
