"""--precision: bf16 autocast only where the hardware has it, only around the encoders; the choice is
printed, stored in the checkpoint and kept on resume."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from moco import precision, step_timing
from moco.__main__ import main
from moco.checkpoint import backbone_from_state, load_checkpoint
from moco.config import TrainConfig, build_config, resolve_stem
from moco.model import MoCo
from moco.step_timing import precision_rates
from tests.moco.conftest import make_image_folder

CPU = torch.device("cpu")
FAST = ["--image-size", "32", "--stem", "imagenet", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--seed", "1", "--no-channels-last", "--epochs", "1"]


def rates(fp32: float, bf16: float):
    return lambda: {"fp32": fp32, "bf16": bf16}


def refuse():
    raise AssertionError("the step was timed where the choice does not depend on it")


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    dtype, reason = precision.choose_precision("auto", CPU, rates=refuse)
    assert dtype is None and reason.startswith("fp32") and "AMX" in reason


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(130.0, 195.0, torch.bfloat16), (323.0, 297.0, None),
                                                       (100.0, 110.0, None), (100.0, 116.0, torch.bfloat16)])
def test_auto_on_a_bf16_cpu_keeps_bf16_only_where_it_timed_clearly_faster(monkeypatch, fp32, bf16, chosen):
    """The rates of the first two cases were measured on a 2-core AMX Xeon (ResNet-18, 64 and 32 px);
    a gain inside the timing's noise (1.10x) is not worth the change of arithmetic."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    dtype, reason = precision.choose_precision("auto", CPU, rates=rates(fp32, bf16))
    assert dtype == chosen
    assert reason.startswith("bf16" if chosen else "fp32")
    assert f"{bf16:.0f} img/s in bf16 against {fp32:.0f} in fp32" in reason
    if chosen is None:
        assert "--precision bf16" in reason


def test_auto_on_a_bf16_cpu_that_was_not_timed_stays_fp32_and_says_how_to_ask(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    dtype, reason = precision.choose_precision("auto", CPU)
    assert dtype is None and reason.startswith("fp32") and "--precision bf16" in reason
    assert precision.choose_precision("bf16", CPU, rates=refuse)[0] == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_follows_the_gpu_check(monkeypatch, native):
    monkeypatch.setattr(precision, "cuda_has_fast_bf16", lambda device: native)
    chosen = precision.choose_precision("auto", torch.device("cuda"), rates=refuse)[0]
    assert chosen == (torch.bfloat16 if native else None)


def test_auto_avoids_bf16_under_torch_compile_on_a_cpu(monkeypatch):
    # the inductor-compiled step under bf16 autocast gave a NaN first loss on an AMX CPU (torch 2.14)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    dtype, reason = precision.choose_precision("auto", CPU, compiled=True, rates=rates(100.0, 200.0))
    assert dtype is None and "torch.compile" in reason
    assert precision.choose_precision("bf16", CPU, compiled=True)[0] == torch.bfloat16  # as asked


def test_forced_choices_ignore_the_hardware_and_bad_words_are_refused(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.choose_precision("bf16", CPU)[0] == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.choose_precision("fp32", CPU)[0] is None
    with pytest.raises(ValueError, match="--precision"):
        precision.choose_precision("fp16", CPU)


def test_the_real_capability_check_answers_a_bool():
    assert isinstance(precision.cpu_has_fast_bf16(), bool)


def tiny(precision_name: str) -> MoCo:
    torch.manual_seed(0)
    return MoCo(build_config(dict(arch="resnet18", image_size=32, queue_size=16, dim=8, bn_splits=2,
                                  precision=precision_name)))


def test_bf16_runs_the_encoders_in_bf16_and_keeps_loss_queue_and_embeddings_float32():
    model = tiny("bf16")
    seen = []
    model.encoder_q.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = model(x1, x2, 0.99)
    assert seen == [torch.bfloat16]  # autocast did reach the encoder
    assert loss.dtype == torch.float32 and model.queue.dtype == torch.float32
    assert model.queries(x1).dtype == torch.float32 and model.keys(x2).dtype == torch.float32
    loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.encoder_q.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in model.encoder_k.parameters())  # the momentum update's


def test_the_loss_stays_float32_inside_a_callers_autocast():
    model = tiny("fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.99)
    assert loss.dtype == torch.float32


def test_a_bf16_step_loss_is_close_to_the_fp32_one():
    fp32 = tiny("fp32")
    bf16 = copy.deepcopy(fp32)
    bf16.precision = "bf16"
    torch.manual_seed(1)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    exact, rounded = fp32(x1, x2, 0.99), bf16(x1, x2, 0.99)
    assert rounded.item() != exact.item()  # bf16 did round something
    assert rounded.item() == pytest.approx(exact.item(), rel=2e-2)
    # the same keys went into the queue, to bf16 rounding: each newest column points the same way
    cosines = (bf16.queue[:, :8] * fp32.queue[:, :8]).sum(dim=0)
    assert cosines.min() > 0.98, cosines


def trained(tmp_path, *extra: str, name: str = "run"):
    run = tmp_path / name
    from tests.moco.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data")
    assert main(["train", str(data), "--out", str(run), *FAST, *extra]) == 0
    return run


def test_the_choice_is_printed_stored_and_kept_on_resume(tmp_path, capsys):
    run = trained(tmp_path, "--precision", "bf16")
    assert "precision: bf16 as asked" in capsys.readouterr().out
    config = load_checkpoint(run)["config"]
    assert (config["precision"], config["precision_reason"]) == ("bf16", "bf16 as asked")

    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "precision: bf16, kept from the checkpoint" in capsys.readouterr().out
    assert load_checkpoint(run)["config"]["precision"] == "bf16"

    # asked for another precision on resume: allowed (the weights are float32 either way), and noted
    assert main(["train", "--resume", str(run), "--epochs", "3", "--precision", "fp32"]) == 0
    assert "note: precision bf16 -> fp32 on resume" in capsys.readouterr().out
    config = load_checkpoint(run)["config"]
    assert config["precision"] == "fp32" and "precision bf16 -> fp32 on resume" in config["notes"]


@pytest.mark.parametrize(("fast", "word"), [(True, "bf16"), (True, "fp32"), (False, "fp32")])
def test_auto_is_resolved_from_the_machine_and_stored(tmp_path, monkeypatch, capsys, fast, word):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)
    timed = []

    def timing(config, device, world_size=1):
        timed.append((config.image_size, config.batch_size, world_size))
        return {"fp32": 100.0, "bf16": 200.0 if word == "bf16" else 90.0}

    monkeypatch.setattr(step_timing, "precision_rates", timing)
    run = trained(tmp_path)
    out = capsys.readouterr().out
    config = load_checkpoint(run)["config"]
    assert config["precision"] == word and f"precision: {config['precision_reason']}" in out
    if fast:  # the run's own shapes were timed, once
        assert timed == [(32, 8, 1)] and "timed at" in config["precision_reason"]
    else:
        assert timed == [] and "AMX" in config["precision_reason"]
    # the configuration printed at start is the resolved one
    printed = json.loads(next(line for line in out.splitlines() if line.startswith("configuration: "))[15:])
    assert printed["precision"] == word


def test_the_step_timing_measures_both_precisions_without_touching_the_runs_random_numbers():
    config = build_config(dict(arch="resnet18", image_size=32, queue_size=16, dim=8, bn_splits=2, batch_size=8,
                               multi_crop=2, small_crop_size=16))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    measured = precision_rates(config, CPU, steps=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(measured) == {"fp32", "bf16"} and all(rate > 0 for rate in measured.values())


def test_the_forward_timing_leaves_the_backbone_and_the_random_numbers_as_they_were():
    from moco.backbones import build_backbone
    from moco.step_timing import forward_rates

    backbone = build_backbone("resnet18", stem="small", image_size=16).train()
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(5)
    before = torch.get_rng_state()
    measured = forward_rates(backbone, 16, CPU, batch=4, steps=1)
    assert torch.equal(torch.get_rng_state(), before) and backbone.training
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())  # BN statistics too
    assert set(measured) == {"fp32", "bf16"} and all(rate > 0 for rate in measured.values())


def test_a_bad_precision_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path), "--precision", "fp16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--precision" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bf16_features_are_float32_and_close_to_fp32(tmp_path):
    from moco.backbones import build_backbone
    from moco.data import open_folder
    from moco.evaluate import extract_features
    from tests.moco.conftest import make_image_folder

    folder = open_folder(make_image_folder(tmp_path / "data", per_class=4))
    torch.manual_seed(0)
    net = build_backbone("resnet18", image_size=32)
    options = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=CPU, workers=0,
                   channels_last=True)
    exact = extract_features(net, folder, folder.labeled, precision="fp32", **options).vectors
    rounded = extract_features(net, folder, folder.labeled, precision="bf16", **options).vectors
    assert exact.dtype == rounded.dtype == np.float32
    assert not np.array_equal(exact, rounded)
    assert (exact * rounded).sum(axis=1).min() > 0.99  # cosine of each image's two features


@pytest.mark.parametrize(("bf16_rate", "stem", "word"), [(250.0, "small", "bf16"), (100.0, "imagenet", "fp32")])
def test_a_cpu_budget_at_32_px_keeps_the_small_stem_only_where_bf16_pays(tmp_path, monkeypatch, capsys,
                                                                         bf16_rate, stem, word):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(step_timing, "precision_rates", lambda *args, **kwargs: {"fp32": 100.0, "bf16": bf16_rate})
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), "--image-size", "32", "--batch-size", "8", "--workers", "0",
                 "--seed", "1", "--no-channels-last", "--time-budget", "5s"]) == 0
    out = capsys.readouterr().out
    state = load_checkpoint(run)
    config = state["config"]
    assert config["precision"] == word and resolve_stem(TrainConfig.from_dict(config)) == stem
    said = "note: stem auto -> imagenet: this run is fp32 on a CPU with a time budget" in out
    assert said == (stem == "imagenet") and (stem == "imagenet") == any("stem auto" in n for n in config["notes"])
    # the shipped weights are those of the stem the stored config names: they load into it
    backbone, _ = backbone_from_state(state)
    assert backbone(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
