"""`python -m exports` as a user meets it: the model it writes honours Contract 2, matches
PyTorch, and every bad input ends as one line, exit code 2, and no file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exports import verify
from exports.__main__ import main
from exports.contract import METADATA_KEYS
from indexer.images import apply_resize, load_rgb, resize_recipe, scan_images, to_uint8_array
from moco import load_backbone
from moco.checkpoint import load_checkpoint, save_checkpoint
from tests.exports.conftest import IMAGE_SIZE
from tests.moco.conftest import write_crafted_checkpoint
from tests.oneline import assert_one_line_error


@pytest.fixture(scope="module")
def model_fp32(tmp_path_factory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("models") / "fp32.onnx"
    assert main([str(checkpoint), "-o", str(out), "--device", "cpu"]) == 0
    return out


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference(checkpoint: Path, images: np.ndarray, *, head: bool = False) -> np.ndarray:
    """PyTorch embeddings computed independently of exports.onnx: numpy preprocessing, the
    public load_backbone, numpy L2 normalization."""
    net, config = load_backbone(checkpoint, head=head)
    mean = np.asarray(config["mean"], np.float32)
    std = np.asarray(config["std"], np.float32)
    x = ((images.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        feats = net(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def folder_pixels(root: Path, limit: int = 10) -> np.ndarray:
    refs = scan_images(root)[:limit]
    return np.stack([to_uint8_array(apply_resize(load_rgb(r.path), resize_recipe(IMAGE_SIZE))) for r in refs])


# -- the model ---------------------------------------------------------------------------------


def test_model_signature_and_metadata(model_fp32, checkpoint, images):
    model = onnx.load(str(model_fp32))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [IMAGE_SIZE, IMAGE_SIZE, 3]
    assert out.name == "embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[1].dim_value == 512
    props = {p.key: p.value for p in model.metadata_props}
    assert sorted(props) == sorted([*METADATA_KEYS, "moco.precision"])  # + the variant, fp32 here
    assert props["moco.precision"] == "fp32"
    assert props["moco.image_size"] == "32" and props["moco.embedding_dim"] == "512"
    assert props["moco.arch"] == "resnet18" and props["moco.preset"] == "v2"
    assert props["moco.resize"] == "short_side=37;center_crop=32"
    assert [float(v) for v in props["moco.mean"].split(",")] == pytest.approx([0.485, 0.456, 0.406])
    assert [float(v) for v in props["moco.std"].split(",")] == pytest.approx([0.229, 0.224, 0.225])
    assert props["moco.checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert props["moco.train_data"] == f"24 images in {images.resolve()}"  # the folder, so indexer can match it
    assert props["moco.format_version"] == "1"


def test_graph_is_inference_only(model_fp32):
    model = onnx.load(str(model_fp32))
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"BatchNormalization", "Dropout", "Identity", "Constant"}, ops
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert os.stat(model_fp32).st_mode & 0o044  # readable by others, like any new file


@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_pytorch(model_fp32, checkpoint, batch):
    images = np.random.default_rng(batch).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    got = session(model_fp32).run(None, {"images": images})[0]
    assert got.shape == (batch, 512) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert verify.row_cosines(got, reference(checkpoint, images)).min() >= 0.9999


def test_parity_on_real_images(model_fp32, checkpoint, images):
    pixels = folder_pixels(images)
    got = session(model_fp32).run(None, {"images": pixels})[0]
    assert verify.row_cosines(got, reference(checkpoint, pixels)).min() >= 0.9999


@pytest.mark.parametrize("value", [0, 255])
def test_uint8_range_edges(model_fp32, checkpoint, value):
    images = np.full((2, IMAGE_SIZE, IMAGE_SIZE, 3), value, dtype=np.uint8)
    got = session(model_fp32).run(None, {"images": images})[0]
    assert np.all(np.isfinite(got))
    assert verify.row_cosines(got, reference(checkpoint, images)).min() >= 0.9999


def test_head_embeddings(tmp_path, checkpoint):
    out = tmp_path / "head.onnx"
    assert main([str(checkpoint), "-o", str(out), "--head", "--device", "cpu"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["moco.embedding_dim"] == "128"
    images = np.random.default_rng(3).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    got = session(out).run(None, {"images": images})[0]
    assert got.shape == (3, 128)
    assert verify.row_cosines(got, reference(checkpoint, images, head=True)).min() >= 0.9999


def test_int8_with_calibration(tmp_path, checkpoint, images, model_fp32, capsys):
    out = tmp_path / "int8.onnx"
    argv = [str(checkpoint), "-o", str(out), "--int8", "--calibration", str(images), "--device", "cpu"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "int8 vs fp32, top-10 neighbour overlap" in log and f"on 24 images from {images}: ok" in log
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert ops[-1] == "Div"  # the L2 normalization stays in float
    assert out.stat().st_size < model_fp32.stat().st_size / 3
    pixels = folder_pixels(images, limit=24)
    got = session(out).run(None, {"images": pixels})[0]
    want = session(model_fp32).run(None, {"images": pixels})[0]
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert verify.row_cosines(got, want).mean() > 0.98


def test_int8_refuses_without_calibration_when_the_training_folder_is_gone(tmp_path, checkpoint, capsys):
    state = load_checkpoint(checkpoint)
    state["data"]["root"] = str(tmp_path / "moved-away")
    moved = tmp_path / "run" / "checkpoint.pt"
    moved.parent.mkdir()
    save_checkpoint(moved, state)
    out = tmp_path / "models" / "int8.onnx"
    assert main([str(moved), "-o", str(out), "--int8"]) == 2
    assert_one_line_error(capsys, f"{tmp_path / 'moved-away'}, is gone; give --calibration")
    assert not (tmp_path / "models").exists()


def test_fp16(tmp_path, checkpoint, model_fp32):
    out = tmp_path / "fp16.onnx"
    assert main([str(checkpoint), "-o", str(out), "--fp16", "--device", "cpu", "--check-images", "64"]) == 0
    model = onnx.load(str(out))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    images = np.random.default_rng(5).integers(0, 256, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    got = session(out).run(None, {"images": images})[0]
    want = session(model_fp32).run(None, {"images": images})[0]
    assert got.dtype == np.float32
    assert verify.row_cosines(got, want).min() > 0.999


# -- refusals ----------------------------------------------------------------------------------


def _wrong_version(tmp_path: Path, checkpoint: Path) -> Path:
    state = load_checkpoint(checkpoint)
    state["config"]["format_version"] = 99
    path = tmp_path / "v99.pt"
    save_checkpoint(path, state)
    return path


def _truncated(tmp_path: Path, checkpoint: Path) -> Path:
    path = tmp_path / "broken.pt"
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no checkpoint"),
    ("garbage", "damaged"),
    ("truncated", "damaged"),
    ("version", "format version 99"),
    ("output-is-folder", "is a folder"),
    ("output-under-a-file", "is not a folder"),
    ("bad-calibration", "no such folder"),
    ("bad-opset", "--opset"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, checkpoint, capsys, case, needle):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ckpt, out, extra = checkpoint, out_dir / "m.onnx", []
    if case == "missing":
        ckpt = inputs / "nothing.pt"
    elif case == "garbage":
        ckpt = inputs / "garbage.pt"
        ckpt.write_bytes(b"not a checkpoint at all")
    elif case == "truncated":
        ckpt = _truncated(inputs, checkpoint)
    elif case == "version":
        ckpt = _wrong_version(inputs, checkpoint)
    elif case == "output-is-folder":
        out = out_dir
    elif case == "output-under-a-file":
        in_the_way = inputs / "a-file"
        in_the_way.write_text("not a folder")
        out = in_the_way / "m.onnx"
    elif case == "bad-calibration":
        extra = ["--fp16", "--calibration", str(inputs / "nope")]
    elif case == "bad-opset":
        extra = ["--opset", "7"]
    assert main([str(ckpt), "-o", str(out), "--device", "cpu", *extra]) == 2
    assert_one_line_error(capsys, needle)
    assert list(out_dir.iterdir()) == []  # nothing partial, no temp file


@pytest.mark.parametrize("form", ["torch", "pickle2", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, form):
    """Checkpoints are unpickled with torch's weights-only loader: code in one never runs."""
    marker = tmp_path / "marker"
    ckpt = write_crafted_checkpoint(tmp_path / "checkpoint.pt", marker, form=form)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main([str(ckpt), "-o", str(out_dir / "m.onnx"), "--device", "cpu"]) == 2
    assert_one_line_error(capsys, "cannot read checkpoint" if form == "pickle" else "refused to load")
    assert not marker.exists()
    assert list(out_dir.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder(tmp_path, checkpoint, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main([str(checkpoint), "-o", str(locked / "m.onnx")]) == 2
        assert_one_line_error(capsys, "not writable")
    finally:
        locked.chmod(0o700)


def test_failed_verification_writes_nothing(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(verify, "FP32_MIN_COSINE", 1.5)  # no model can reach it
    out = tmp_path / "m.onnx"
    assert main([str(checkpoint), "-o", str(out), "--device", "cpu"]) == 1
    assert_one_line_error(capsys, "verification failed")
    assert list(tmp_path.iterdir()) == []
    assert main([str(checkpoint), "-o", str(out), "--device", "cpu", "--no-verify"]) == 0
    assert "writing anyway" in capsys.readouterr().out
    assert out.exists()


def test_cuda_refused_without_gpu(tmp_path, checkpoint, capsys):
    from indexer.runtime import CUDA, usable_providers

    if CUDA in usable_providers():
        pytest.skip("this machine has a usable CUDA provider")
    assert main([str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--device", "cuda"]) == 2
    assert_one_line_error(capsys, "cuda")


# -- info --------------------------------------------------------------------------------------


def test_info_prints_everything(model_fp32, capsys):
    assert main(["info", str(model_fp32)]) == 0
    out = capsys.readouterr().out
    for key in METADATA_KEYS:
        assert key in out
    assert "images: uint8 [N, 32, 32, 3]" in out
    assert "embeddings: float32 [N, 512]" in out
    assert f"{model_fp32.stat().st_size:,} bytes" in out
    assert "CPUExecutionProvider" in out and "usable here" in out
    assert "precision  fp32" in out


def test_info_runs_without_torch(model_fp32):
    """`info` is what a serving-only install (no PyTorch) uses to inspect a model."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from exports.__main__ import main\n"
            f"sys.exit(main(['info', {str(model_fp32)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "moco.embedding_dim" in done.stdout


def test_info_refuses_model_without_props(tmp_path, capsys):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert main(["info", str(path)]) == 2
    assert_one_line_error(capsys, "not a MoCo embedding model")


@pytest.mark.parametrize("content", [None, b"\x00garbage\xff" * 10])
def test_info_refuses_missing_or_garbage(tmp_path, capsys, content):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["info", str(path)]) == 2
    assert_one_line_error(capsys, str(path))


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m exports" in out
    description = out.split("\n\n")[1]  # the paragraph after the usage block says what it does
    assert len(description.split()) >= 8 and not description.startswith(("positional", "options")), out
    assert "example" in out and "python -m exports " in out


def test_missing_output_folders_are_created(tmp_path, checkpoint, monkeypatch):
    """`python -m exports CKPT -o models/x.onnx` on a fresh clone: models/ is made, as it is needed."""
    monkeypatch.chdir(tmp_path)
    assert main([str(checkpoint), "-o", "models/x.onnx", "--device", "cpu"]) == 0
    assert (tmp_path / "models" / "x.onnx").is_file()
    # A failed export leaves no folder behind either: nothing written means nothing.
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main([str(garbage), "-o", str(tmp_path / "new" / "deep" / "m.onnx"), "--device", "cpu"]) == 2
    assert not (tmp_path / "new").exists()


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ckpt.pt", "-o", "m.onnx", "--fp16", "--int8"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys, "not allowed with")
