"""The command line as a user meets it: end to end, and every bad input as one line + exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from moco import load_backbone
from moco.__main__ import main
from moco.checkpoint import load_checkpoint, save_checkpoint
from tests.moco.conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--no-channels-last"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    train = make_image_folder(root / "train", per_class=8, seed=0)
    val = make_image_folder(root / "val", per_class=4, seed=1)
    run = root / "run"
    assert main(["train", str(train), "--out", str(run), *FAST, "--epochs", "2", "--batch-size", "8",
                 "--val", str(val)]) == 0
    return train, val, run


def assert_one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_train_then_eval_json(trained, capsys):
    train, val, run = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= r["knn_top1"] <= 1.0 for r in epochs)
    assert (run / "monitor.png").read_bytes()[:4] == b"\x89PNG"  # the accuracy-versus-time curve
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoint.pt"), "--train", str(train), "--val", str(val), "--json",
                 "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("knn_top1", "linear_top1", "few_label_1pct", "few_label_10pct"):
        assert 0.0 <= result[key] <= 1.0 and result[key + "_std"] >= 0.0


def test_eval_prints_a_table_and_a_random_baseline(trained, capsys):
    train, val, run = trained
    assert main(["eval", str(run), "--train", str(train), "--val", str(val), "--random-init", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("random-init resnet18 @ 32px") and "weighted kNN top-1" in out


def test_batchnorm_recalibration_measures_the_data(trained):
    from moco.backbones import build_backbone
    from moco.data import open_folder
    from moco.evaluate import extract_features, recalibrate_batchnorm

    train, _, _ = trained
    folder = open_folder(train)
    torch.manual_seed(0)
    net = build_backbone("resnet18", image_size=32)
    options = dict(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"),
                   workers=0)
    before = extract_features(net, folder, folder.labeled, channels_last=False, **options).vectors
    recalibrate_batchnorm(net, folder, **options)
    after = extract_features(net, folder, folder.labeled, channels_last=False, **options).vectors
    # the first BN now holds the exact mean of conv1's outputs over the images
    from moco.data import EvalImages

    images = torch.stack([EvalImages(folder.refs, 32)[i][0] for i in range(len(folder.refs))]).float() / 255
    conv1 = net.conv1((images - 0.5) / 0.25)
    torch.testing.assert_close(net.bn1.running_mean, conv1.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-4)
    assert not net.training and net.bn1.momentum == 0.1
    # features spread across images instead of vanishing
    assert after.std(axis=0).mean() > 2 * before.std(axis=0).mean()


def test_evaluation_pipeline_separates_classes_with_a_known_feature(trained):
    """Mean colour is a perfect feature for the blobs: every classifier must find it."""
    from moco.data import open_folder
    from moco.evaluate import evaluate_backbone

    train, val, _ = trained
    mean_colour = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    train_folder = open_folder(train)
    results, failures = evaluate_backbone(
        mean_colour, train_folder, open_folder(val, classes=train_folder.classes), image_size=32,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"), workers=0, seeds=(0, 1),
        knn_k=5)
    assert not failures
    assert results["knn_top1"] > 0.9 and results["linear_top1"] > 0.9


def test_checkpoint_contract_and_load_backbone(trained):
    _, _, run = trained
    state = load_checkpoint(run)
    config = state["config"]
    for key in ("arch", "preset", "image_size", "mean", "std", "embedding_dim", "format_version"):
        assert key in config
    # budget-aware defaults: 6 planned steps, so the key momentum was lowered, and that is recorded
    assert config["moco_m"] == 0.9 and any(n.startswith("moco_m 0.999 -> 0.9") for n in config["notes"])
    for key in ("optimizer", "rng", "progress", "plan", "model"):
        assert key in state
    assert "queue" in state["model"] and "queue_ptr" in state["model"]
    backbone, cfg = load_backbone(run / "checkpoint.pt")
    assert not backbone.training
    features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, cfg["embedding_dim"]) == (2, 512)
    # plain torchvision weights: no split-BN or other training-only modules leak out
    plain = resnet18()
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(backbone.state_dict())
    head, cfg = load_backbone(run, head=True)
    assert head(torch.randn(2, 3, 32, 32)).shape == (2, cfg["dim"])


def test_demo_data_writes_all_digits(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "digits")]) == 0
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(d) for d in range(10)]
    files = list((tmp_path / "digits").glob("*/*.png"))
    assert len(files) == 1797
    from PIL import Image

    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.parametrize("case, needle", [
    ("empty", "no images found"),
    ("missing", "no such folder"),
    ("big-batch", "larger than the"),
    ("preset", "unknown preset 'v9'"),
    ("arch", "unknown arch 'resnet999'"),
    ("resume-missing", "no checkpoint at"),
    ("exists", "already holds a run"),
    ("out-is-file", "exists and is not a folder"),
    ("out-under-file", "cannot make the run folder"),
    ("device", "--device must be"),
])
def test_bad_training_input_is_one_line_and_exit_2(case, needle, tmp_path, capsys, trained):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    (tmp_path / "empty").mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    args = {
        "empty": ["train", str(tmp_path / "empty")],
        "missing": ["train", str(tmp_path / "nowhere")],
        "big-batch": ["train", str(folder), "--batch-size", "64"],
        "preset": ["train", str(folder), "--preset", "v9"],
        "arch": ["train", str(folder), "--arch", "resnet999"],
        "resume-missing": ["train", "--resume", str(tmp_path / "norun")],
        "exists": ["train", str(folder), "--out", str(trained[2])],
        "out-is-file": ["train", str(folder), "--out", str(a_file)],
        "out-under-file": ["train", str(folder), "--out", str(a_file / "run")],
        "device": ["train", str(folder), "--device", "tpu"],
    }[case]
    own_out = case in ("exists", "out-is-file", "out-under-file") or "--resume" in args
    assert main(args if own_out else [*args, "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, needle)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_checkpoint_of_another_format_version_is_refused(trained, tmp_path, capsys):
    train, val, run = trained
    state = load_checkpoint(run)
    state["config"]["format_version"] = 99
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert main(["eval", str(tmp_path / "checkpoint.pt"), "--train", str(train), "--val", str(val)]) == 2
    assert_one_line_error(capsys, "format version 99")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "format version 99")


def test_a_damaged_checkpoint_is_refused(trained, tmp_path, capsys):
    train, val, _ = trained
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80garbage")
    assert main(["eval", str(tmp_path / "checkpoint.pt"), "--train", str(train), "--val", str(val)]) == 2
    assert_one_line_error(capsys, "cannot read checkpoint")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "many"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys, "invalid int value")
    with pytest.raises(SystemExit):
        main(["fly"])
    assert_one_line_error(capsys, "invalid choice")


def test_every_command_has_help(capsys):
    for command in (["--help"], ["train", "--help"], ["eval", "--help"], ["demo-data", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        description = out.split("\n\n")[1]  # the paragraph after the usage block says what it does
        assert len(description.split()) >= 8 and not description.startswith(("positional", "options")), out
        if command[0] != "--help":
            assert f"python -m moco {command[0]}" in out.split("\n\n")[-1], out  # an example closes the help
        else:
            assert "demo-data" in out


def test_training_output_has_no_raw_library_warnings(tmp_path):
    """What a new user reads: the trainer's own lines and progress, not a library's UserWarning
    or DeprecationWarning (shown here with -W default, which Python hides outside __main__)."""
    train = make_image_folder(tmp_path / "train", per_class=6, seed=0)
    done = subprocess.run([sys.executable, "-W", "default", "-m", "moco", "train", str(train), "--out",
                           str(tmp_path / "run"), *FAST, "--epochs", "1", "--batch-size", "8", "--val", str(train)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    noisy = [line for line in (done.stderr + done.stdout).splitlines() if "Warning:" in line]
    assert noisy == [], noisy


@pytest.mark.parametrize(("fast", "bf16_rate", "word"), [(True, 250.0, "bf16"), (True, 105.0, "fp32"),
                                                         (False, 250.0, "fp32")])
def test_eval_auto_times_the_backbone_and_says_what_it_chose(trained, capsys, monkeypatch, fast, bf16_rate, word):
    """On a CPU with native bf16, `moco eval --precision auto` times the backbone's forward in both
    precisions and keeps bf16 only at 1.15x or more; elsewhere nothing is timed. The choice and
    both rates are printed, and the evaluation runs in the chosen precision."""
    from moco import precision, step_timing

    train, val, run = trained
    timed, used = [], []
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast)

    def timing(backbone, size, device, **kwargs):
        timed.append(size)
        return {"fp32": 100.0, "bf16": bf16_rate}

    def recorded_autocast(device, chosen):
        used.append(chosen)
        return precision.autocast(device, chosen)

    monkeypatch.setattr(step_timing, "forward_rates", timing)
    monkeypatch.setattr("moco.evaluate.autocast", recorded_autocast)
    capsys.readouterr()
    assert main(["eval", str(run), "--train", str(train), "--val", str(val), "--json", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("precision of feature extraction: "))
    assert line.split(": ", 1)[1].startswith(word) and set(used) == {word}
    if fast:
        assert timed == [32] and f"timed at {bf16_rate:.0f} img/s in bf16 against 100 in fp32" in line
    else:
        assert timed == [] and "AMX" in line
