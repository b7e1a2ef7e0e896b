"""`python -m exports --with-int8`: the fp32 model and its verified int8 sibling in one command,
and the indexer recognising that sibling as a stand-in for exactly this fp32 file (issue 18 item 3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from exports import verify
from exports.__main__ import main
from indexer import models
from tests.oneline import assert_one_line_error

VNNI = frozenset({"avx512_vnni"})


def props_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, checkpoint) -> tuple[Path, Path, str]:
    """One --with-int8 export, calibrated on the training folder the checkpoint records."""
    out = tmp_path_factory.mktemp("pair") / "models" / "flowers.onnx"
    log: list[str] = []
    import exports.onnx as export_onnx

    options = export_onnx.ExportOptions(checkpoint=checkpoint, output=out, device="cpu", with_int8=True)
    out.parent.mkdir(parents=True)
    result = export_onnx.export_checkpoint(options, log=log.append)
    assert result.int8 is not None and result.int8.path == out.with_name("flowers-int8.onnx")
    return out, result.int8.path, "\n".join(log)


def test_one_command_writes_both_and_says_where_it_calibrated(pair, images):
    fp32, int8, log = pair
    assert fp32.is_file() and int8.is_file()
    assert f"int8 calibration and check on the training folder recorded in the checkpoint: {images.resolve()}" in log
    assert "int8 vs fp32, top-10 neighbour overlap" in log and f"on 24 images from {images.resolve()}: ok" in log
    assert f"wrote {fp32} " in log and f"wrote {int8} " in log
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert "QuantizeLinear" in ops and "QuantizeLinear" not in {n.op_type for n in onnx.load(str(fp32)).graph.node}


def test_the_sibling_names_its_fp32_model_and_records_its_check(pair):
    fp32, int8, _ = pair
    base, sibling = props_of(fp32), props_of(int8)
    assert base["moco.precision"] == "fp32" and "moco.fp32_model" not in base
    assert sibling["moco.precision"] == "int8"
    assert sibling["moco.fp32_model"] == "flowers.onnx"
    assert sibling["moco.fp32_sha256"] == hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert sibling["moco.checkpoint_sha256"] == base["moco.checkpoint_sha256"]
    check = json.loads(sibling["moco.precision_check"])
    assert check["passed"] is True and check["threshold"] == verify.INT8_MIN_OVERLAP
    assert verify.INT8_MIN_OVERLAP <= check["overlap"] <= 1.0 and check["images"] == 24


def test_the_indexer_takes_the_sibling_on_a_vnni_cpu_only(pair):
    fp32, int8, _ = pair
    chosen = models.choose_variant(fp32, device="cpu", cpu_flags=VNNI)
    assert chosen.path == int8 and chosen.precision == "int8" and "avx512_vnni" in chosen.reason
    assert "verified" in chosen.reason and "top-10 overlap with fp32" in chosen.reason
    plain = models.choose_variant(fp32, device="cpu", cpu_flags=frozenset({"avx2"}))
    assert plain.path == fp32 and plain.precision == "fp32" and "no VNNI/AMX" in plain.reason
    assert models.choose_variant(fp32, device="cpu", given=True, cpu_flags=VNNI).path == fp32  # --model wins


def test_a_re_exported_fp32_model_orphans_the_old_sibling(tmp_path, pair):
    fp32, int8, _ = pair
    other = tmp_path / fp32.name
    other.write_bytes(fp32.read_bytes())  # a copy of the pair elsewhere: still siblings
    (tmp_path / int8.name).write_bytes(int8.read_bytes())
    assert models.choose_variant(other, device="cpu", cpu_flags=VNNI).precision == "int8"
    model = onnx.load(str(other))
    model.doc_string += " (re-exported)"
    onnx.save(model, str(other))  # another fp32 file: the sibling's sha256 no longer matches
    chosen = models.choose_variant(other, device="cpu", cpu_flags=VNNI)
    assert chosen.path == other and "made from another flowers.onnx" in chosen.reason


def test_a_failed_int8_check_writes_only_the_fp32_model(tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(verify, "INT8_MIN_OVERLAP", 1.5)  # no int8 model can reach it
    out = tmp_path / "m.onnx"
    assert main([str(checkpoint), "-o", str(out), "--with-int8", "--device", "cpu"]) == 1
    assert_one_line_error(capsys, f"the verified fp32 model {out} was written, no int8 sibling")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # --no-verify writes it, recorded as failed: the indexer does not take it on its own
    assert main([str(checkpoint), "-o", str(out), "--with-int8", "--device", "cpu", "--no-verify"]) == 0
    assert json.loads(props_of(tmp_path / "m-int8.onnx")["moco.precision_check"])["passed"] is False
    chosen = models.choose_variant(out, device="cpu", cpu_flags=VNNI)
    assert chosen.path == out and "did not pass its check" in chosen.reason


def test_with_int8_excludes_the_single_precisions(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--with-int8", "--int8"])
    assert stop.value.code == 2
    assert_one_line_error(capsys, "not allowed with argument")
    assert list(tmp_path.iterdir()) == []


def test_the_sibling_embeds_like_fp32(pair, images):
    import onnxruntime as ort

    from tests.exports.test_cli import folder_pixels

    fp32, int8, _ = pair
    pixels = folder_pixels(images, limit=24)
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)}
    want, got = (run[p].run(None, {"images": pixels})[0] for p in (fp32, int8))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert verify.row_cosines(got, want).mean() > 0.98
