"""Multi-crop (--multi-crop N): the batched small crops, the loss over global and small queries,
the two-view path unchanged when it is off, tiny real runs, resume, and usage errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from moco.__main__ import main
from moco.batch_augment import BatchMultiCrop, BatchTwoViews, sample_crop_boxes
from moco.checkpoint import load_checkpoint
from moco.config import build_config
from moco.defaults import default_small_crop_size
from moco.model import MoCo
from tests.moco.conftest import killed_after_first_epoch

FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last"]


def step_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def padded_batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    return (torch.randint(0, 256, (n, 3, 40, 48), dtype=torch.uint8),
            torch.tensor([[40, 48], [36, 40], [40, 44], [38, 48], [40, 40], [30, 48]][:n]))


# -- the batched small crops --------------------------------------------------------------------------
def test_multi_crop_gives_the_two_views_of_the_two_view_path_then_the_small_crops():
    images, sizes = padded_batch()
    two = BatchTwoViews("v2", 32, 0.2, blur_relative=True)
    multi = BatchMultiCrop("v2", 32, 0.2, count=3, small_size=16, small_scale=(0.05, 0.3), blur_relative=True)
    a1, a2 = two(images, sizes, torch.Generator().manual_seed(7))
    b1, b2, small = multi(images, sizes, torch.Generator().manual_seed(7))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # the same draws, in the same order
    assert small.shape == (18, 3, 16, 16) and small.dtype == torch.float32
    assert 0.0 <= small.min() and small.max() <= 1.0
    crops = small.view(3, 6, 3, 16, 16)
    assert not torch.equal(crops[0], crops[1])  # each crop draws its own parameters
    # a seed repeats them
    c1, c2, again = multi(images, sizes, torch.Generator().manual_seed(7))
    assert torch.equal(small, again)


def test_small_crops_are_cut_from_their_own_image_with_the_asked_area():
    # each image one flat colour: every small crop of image i must be image i's colour
    colours = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 10]], dtype=torch.uint8)
    images = colours.view(4, 3, 1, 1).expand(4, 3, 40, 48).contiguous()
    sizes = torch.tensor([[40, 48]] * 4)
    multi = BatchMultiCrop("v2", 32, 0.2, count=2, small_size=16, small_scale=(0.05, 0.3))
    multi.small.jitter_p = 0.0  # no colour change, so the source shows
    multi.small.blur_p = 0.0
    _, _, small = multi(images, sizes, torch.Generator().manual_seed(0))
    means = small.mean(dim=(2, 3)).view(2, 4, 3)
    for copy_index in range(2):
        for i in range(4):
            value = means[copy_index, i]
            expected = colours[i].float() / 255
            grey = (0.2989 * expected[0] + 0.587 * expected[1] + 0.114 * expected[2]).expand(3)
            assert torch.allclose(value, expected, atol=1e-4) or torch.allclose(value, grey, atol=1e-4)
    boxes = sample_crop_boxes(torch.tensor([[40, 48]] * 500), (0.05, 0.3), generator=torch.Generator().manual_seed(1))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (40 * 48)
    assert 0.04 <= float(area.min()) and float(area.max()) <= 0.33  # (sides rounded to pixels)


def test_the_default_small_crop_size_is_near_half_the_size_in_multiples_of_8():
    assert [default_small_crop_size(s) for s in (32, 64, 96, 224)] == [16, 32, 40, 104]


# -- the loss ------------------------------------------------------------------------------------------------
def tiny_moco(**overrides) -> MoCo:
    values = dict(arch="resnet18", image_size=32, stem="imagenet", queue_size=16, dim=8, bn_splits=1,
                  precision="fp32")
    values.update(overrides)
    torch.manual_seed(0)
    return MoCo(build_config(values))


def views(n: int = 4, crops: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 3, 32, 32), torch.randn(n, 3, 32, 32), torch.randn(crops * n, 3, 16, 16)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("batch_negatives", [False, True])
def test_the_loss_is_the_mean_over_global_and_small_queries(symmetric, batch_negatives):
    model = tiny_moco(symmetric=symmetric, batch_negatives=batch_negatives)
    reference = copy.deepcopy(model)
    v1, v2, small = views()
    loss = model(v1, v2, 0.99, small)
    # the same step by hand from the model's public parts
    q1, q2 = reference.queries(v1), reference.queries(v2)
    with torch.no_grad():
        reference.momentum_update(0.99)
        k1, k2 = reference.keys(v1), reference.keys(v2)
    qs = reference.queries(small)
    small_losses = [reference.info_nce(q, k2) for q in qs.chunk(2)]
    if symmetric:
        small_losses = [(reference.info_nce(q, k1) + reference.info_nce(q, k2)) / 2 for q in qs.chunk(2)]
        mean = (reference.info_nce(q1, k2) + reference.info_nce(q2, k1) + sum(small_losses)) / 4
        expected = 2 * mean  # the symmetric loss sums its two directions
    else:
        expected = (reference.info_nce(q1, k2) + sum(small_losses)) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_small_crops_are_queries_only_and_their_gradient_reaches_the_query_encoder():
    model = tiny_moco()
    v1, v2, small = views()
    plain = copy.deepcopy(model)
    model(v1, v2, 0.99, small).backward()
    plain(v1, v2, 0.99).backward()
    assert int(model.queue_ptr) == 4 and int(model.queue_filled) == 4  # the global keys only
    torch.testing.assert_close(model.queue, plain.queue)  # the same keys: never from small crops
    grads = [p.grad for p in model.encoder_q.parameters()]
    plain_grads = [p.grad for p in plain.encoder_q.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads, plain_grads))
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_split_batch_norm_and_the_v3_head_take_the_small_crop_batch():
    model = tiny_moco(bn_splits=4, preset="v3", head="v3", queue_size=0, mlp_dim=32)
    v1, v2, small = views(n=8, crops=3)
    loss = model(v1, v2, 0.99, small)
    assert torch.isfinite(loss)
    loss.backward()


def test_multi_crop_off_leaves_the_two_view_step_unchanged():
    model = tiny_moco()
    same = copy.deepcopy(model)
    v1, v2, _ = views()
    assert torch.equal(model(v1, v2, 0.99), same(v1, v2, 0.99, None))


# -- tiny real runs ----------------------------------------------------------------------------------------
def test_zero_small_crops_train_bit_identically_to_the_default(image_folder, tmp_path):
    args = [*FAST, "--epochs", "1", "--deterministic", "--symmetric"]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "default"), *args]) == 0
    assert main(["train", str(image_folder), "--out", str(tmp_path / "zero"), *args, "--multi-crop", "0"]) == 0
    assert step_losses(tmp_path / "zero") == step_losses(tmp_path / "default")


def test_a_multi_crop_run_trains_and_a_resume_keeps_its_flags_exactly(image_folder, tmp_path, monkeypatch, capsys):
    args = [*FAST, "--epochs", "2", "--deterministic", "--multi-crop", "2", "--small-crop-scale", "0.1,0.4"]
    assert main(["train", str(image_folder), "--out", str(tmp_path / "straight"), *args]) == 0
    out = capsys.readouterr().out
    assert "multi_crop 2: 2 small crops per image at 16 px" in out and "0.1-0.4 of the image's area" in out
    config = load_checkpoint(tmp_path / "straight")["config"]
    assert (config["multi_crop"], config["small_crop_size"], config["small_crop_scale"]) == (2, 16, [0.1, 0.4])
    straight = step_losses(tmp_path / "straight")
    assert len(straight) == 6 and all(loss == loss for loss in straight)

    with killed_after_first_epoch(monkeypatch):
        assert main(["train", str(image_folder), "--out", str(tmp_path / "killed"), *args]) == 130
    assert main(["train", "--resume", str(tmp_path / "killed"), "--multi-crop", "4"]) == 2
    assert "only --epochs, --workers, --precision" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    assert step_losses(tmp_path / "killed") == straight
    assert load_checkpoint(tmp_path / "killed")["config"]["multi_crop"] == 2


def test_multi_crop_and_progressive_resolution_train_together(image_folder, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(run), *FAST, "--epochs", "2", "--multi-crop", "2",
                 "--progressive", "0.5", "--symmetric", "--small-crop-size", "16"]) == 0
    losses = step_losses(run)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("flags, needle", [
    (["--multi-crop", "2", "--augment-on", "workers"], "--multi-crop needs --augment-on device"),
    (["--multi-crop", "-1"], "--multi-crop must be 0"),
    (["--multi-crop", "2", "--small-crop-size", "4"], "--small-crop-size must be 8 to"),
    (["--multi-crop", "2", "--small-crop-size", "80"], "--small-crop-size must be 8 to"),
    (["--multi-crop", "2", "--small-crop-scale", "0.3,0.05"], "--small-crop-scale must be LO,HI"),
])
def test_bad_multi_crop_flags_are_one_line_and_exit_2(flags, needle, image_folder, tmp_path, capsys):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_a_malformed_small_crop_scale_is_one_line_and_exit_2(image_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(image_folder), "--multi-crop", "2", "--small-crop-scale", "0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected LO,HI" in err
