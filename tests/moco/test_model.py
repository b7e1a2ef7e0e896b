from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco.config import build_config
from moco.model import MoCo, SplitBatchNorm, split_count, use_split_batchnorm


def tiny_moco(**overrides) -> MoCo:
    # fp32: these tests check the algorithm to float32 rounding on any CPU (bf16: test_precision.py)
    values = dict(arch="resnet18", image_size=32, queue_size=10, dim=8, bn_splits=2, precision="fp32")
    values.update(overrides)
    torch.manual_seed(0)
    return MoCo(build_config(values))


def test_queue_is_fifo_and_wraps_around():
    model = tiny_moco(queue_size=10)
    first = F.normalize(torch.randn(4, 8), dim=1)
    second = F.normalize(torch.randn(4, 8), dim=1)
    third = F.normalize(torch.randn(4, 8), dim=1)
    model.enqueue(first)
    model.enqueue(second)
    assert int(model.queue_ptr) == 8
    model.enqueue(third)  # two keys at 8, 9, then wrap to 0, 1
    assert int(model.queue_ptr) == 2
    assert torch.equal(model.queue[:, 8:10], third[:2].T)
    assert torch.equal(model.queue[:, 0:2], third[2:].T)
    assert torch.equal(model.queue[:, 2:4], first[2:].T)  # oldest survivors untouched
    assert torch.equal(model.queue[:, 4:8], second.T)


def test_queue_takes_a_batch_larger_than_itself():
    model = tiny_moco(queue_size=10)
    keys = F.normalize(torch.randn(13, 8), dim=1)
    model.enqueue(keys)
    assert set(map(tuple, model.queue.T.tolist())) == set(map(tuple, keys[-10:].tolist()))


def test_momentum_update_is_an_exponential_moving_average():
    model = tiny_moco()
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    q_now = [p.detach().clone() for p in model.encoder_q.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(q_before, k_before))  # key starts as a copy
    model.momentum_update(0.9)
    for k_old, q, k_new in zip(k_before, q_now, model.encoder_k.parameters()):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_info_nce_matches_a_hand_computation():
    model = tiny_moco(queue_size=3, temperature=0.5)
    q = F.normalize(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]]), dim=1)
    k = F.normalize(torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]]), dim=1)
    queue = torch.zeros(8, 3)
    queue[0, 0], queue[1, 1], queue[0, 2] = 1.0, 1.0, -1.0
    model.queue.copy_(queue)
    logits = [math.sqrt(0.5) / 0.5, 1.0 / 0.5, 0.0, -1.0 / 0.5]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert model.info_nce(q, k).item() == pytest.approx(expected, rel=1e-6)


def test_v3_in_batch_loss_matches_a_hand_computation():
    model = tiny_moco(preset="v3", queue_size=0, dim=8, mlp_dim=16, temperature=1.0)
    q = F.normalize(torch.randn(3, 8), dim=1)
    k = F.normalize(torch.randn(3, 8), dim=1)
    logits = q @ k.T
    expected = sum(-logits[i, i] + torch.logsumexp(logits[i], 0) for i in range(3)) / 3 * 2
    assert model.info_nce(q, k).item() == pytest.approx(expected.item(), rel=1e-5)


def test_split_count_keeps_two_samples_per_split():
    assert split_count(256, 8) == 8
    assert split_count(12, 8) == 6
    assert split_count(10, 8) == 5
    assert split_count(7, 8) == 1
    assert split_count(2, 8) == 1


def test_split_batchnorm_normalises_each_sub_batch_on_its_own():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2, affine=False)
    x = torch.randn(8, 3, 4, 4)
    x[4:] += 5.0  # sub-batch 1 (the second block of samples) has a very different mean
    out = bn(x)
    for rows in (slice(0, 4), slice(4, 8)):
        block = x[rows]
        mean = block.mean(dim=(0, 2, 3), keepdim=True)
        var = block.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(out[rows], (block - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-4)
    whole = F.batch_norm(x, None, None, training=True)
    assert (out - whole).abs().max() > 1.0  # per-sub-batch statistics really differ
    # running statistics move toward the average over sub-batches (momentum 0.1 from 0 / 1)
    expected_mean = 0.1 * torch.stack([x[:4].mean(dim=(0, 2, 3)), x[4:].mean(dim=(0, 2, 3))]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)


def test_split_batchnorm_works_in_channels_last_and_matches_nchw():
    torch.manual_seed(0)
    bn = SplitBatchNorm(4, num_splits=4)
    x = torch.randn(16, 4, 5, 5)
    nchw = bn(x)
    cl = bn(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, nchw)


def test_split_batchnorm_keeps_the_plain_state_dict():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9, 5), nn.BatchNorm1d(5))
    keys = set(net.state_dict())
    use_split_batchnorm(net, 4)
    assert isinstance(net[1], SplitBatchNorm) and isinstance(net[4], SplitBatchNorm)
    assert set(net.state_dict()) == keys
    assert net(torch.randn(8, 3, 3, 3)).shape == (8, 5)  # 1-D batch norm in heads works too


def test_keys_come_back_in_the_original_order():
    model = tiny_moco()
    model.eval()  # running statistics: each key then depends on its own image only
    images = torch.randn(6, 3, 32, 32)
    direct = F.normalize(model.encoder_k(images), dim=1)
    torch.manual_seed(1)
    shuffled = model.keys(images)
    torch.testing.assert_close(shuffled, direct, rtol=1e-4, atol=1e-5)


def test_key_encoder_sees_a_shuffled_batch(monkeypatch):
    model = tiny_moco()
    seen = {}
    original = model.encoder_k.forward
    monkeypatch.setattr(model.encoder_k, "forward", lambda x: seen.setdefault("x", x) is not None and original(x))
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    torch.manual_seed(3)
    model.keys(images)
    order = seen["x"][:, 0, 0, 0].tolist()
    assert sorted(order) == list(range(8)) and order != list(range(8))


def test_symmetric_loss_enqueues_once_after_both_directions(monkeypatch):
    model = tiny_moco(symmetric=True, queue_size=16, bn_splits=1)
    pointers = []
    original = model.info_nce
    monkeypatch.setattr(model, "info_nce", lambda q, k: pointers.append(int(model.queue_ptr)) or original(q, k))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = model(x1, x2, 0.99)
    assert pointers == [0, 0]  # both directions saw the queue before any key was added
    assert int(model.queue_ptr) == 8  # then both views' keys, once
    assert torch.isfinite(loss)


def test_v3_forward_runs_and_backpropagates():
    model = tiny_moco(preset="v3", queue_size=0, dim=8, mlp_dim=16)
    assert model.predictor is not None
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.99)
    loss.backward()
    assert model.predictor[0].weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_v3_with_a_vit_backbone_uses_the_published_vit_recipe():
    config = build_config(dict(preset="v3", arch="vit_small", image_size=32, queue_size=0, dim=8, mlp_dim=16))
    assert (config.optimizer, config.temperature, config.stop_grad_conv1) == ("adamw", 0.2, True)
    torch.manual_seed(0)
    model = MoCo(config)
    assert not any(p.requires_grad for p in model.encoder_q.backbone.conv_proj.parameters())  # frozen patches
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.99)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder_q.backbone.encoder.layers[0].mlp[0].weight.grad is not None


def test_an_empty_start_queue_counts_only_real_keys():
    model = tiny_moco(queue_size=6, queue_start="empty", temperature=1.0)
    q = F.normalize(torch.randn(2, 8), dim=1)
    k = F.normalize(torch.randn(2, 8), dim=1)
    # Nothing enqueued yet: the loss is that of the positive alone, whatever the queue holds.
    assert model.info_nce(q, k).item() == pytest.approx(0.0, abs=1e-6)
    keys = F.normalize(torch.randn(4, 8), dim=1)
    model.enqueue(keys)
    assert int(model.queue_filled) == 4
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ keys.T], dim=1)
    expected = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert model.info_nce(q, k).item() == pytest.approx(expected.item(), rel=1e-5)
    model.enqueue(keys)  # wraps around: all six slots now hold real keys
    assert int(model.queue_filled) == 6


def test_batch_negatives_add_the_other_keys_of_the_batch():
    model = tiny_moco(queue_size=3, batch_negatives=True, temperature=0.5)
    q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    logits = torch.cat([q @ k.T, q @ model.queue], dim=1) / 0.5
    expected = F.cross_entropy(logits, torch.arange(4))
    assert model.info_nce(q, k).item() == pytest.approx(expected.item(), rel=1e-5)


def test_shrinking_a_partly_filled_queue_keeps_its_real_keys_first():
    model = tiny_moco(queue_size=10, queue_start="empty")
    keys = F.normalize(torch.randn(3, 8), dim=1)
    model.enqueue(keys)
    model.shrink_queue(6)
    assert model.queue.shape[1] == 6 and int(model.queue_filled) == 3 and int(model.queue_ptr) == 3
    assert torch.equal(model.queue[:, :3], keys.T)


@pytest.mark.parametrize("stem, side", [("small", 32), ("small_pool", 16), ("imagenet", 8)])
def test_each_stem_hands_the_first_stage_its_map_size(stem, side):
    # The stems trade arithmetic for resolution: at 32 px the small stem keeps the whole map,
    # small_pool halves its side with the max-pool, the ImageNet stem quarters it.
    from moco.backbones import build_backbone

    net = build_backbone("resnet18", stem=stem, image_size=32)
    seen = []
    net.layer1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[-1]))
    features = net(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 512) and seen == [side]


def test_an_unknown_stem_is_refused_naming_the_choices():
    from moco.config import ConfigError

    with pytest.raises(ConfigError, match="small_pool"):
        build_config({"stem": "tiny"})
