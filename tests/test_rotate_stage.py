"""The rotate stage through the pipeline: `--rotate` before GPTQ / RTN / W8A8 on the tiny LLaMA; the float
model checked unchanged, every later stage measuring the rotated graph, the recipe reproducing the output."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from graphs import run
from ptqonnx.cli import main
from ptqonnx.config import RotateConfig
from ptqonnx.registry import recipe_for
from ptqonnx.report import RotationSummary


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from ptqonnx.models.tiny import tiny_corpus

    text = tmp_path_factory.mktemp("rot_calib") / "calib.txt"
    text.write_text(" ".join(tiny_corpus(800, seed=4)))
    return ["--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "32"]


def argv_without_rotation(argv: list[str]) -> list[str]:
    return [a for a in argv if a not in ("--no-r2", "--no-r4")]


@pytest.mark.parametrize("argv", [["--method", "rtn"], ["--method", "gptq"], ["--w8a8", "--target", "ort-cpu"],
                                  ["--method", "smoothquant", "--w8a8", "--no-r4"], ["--method", "awq", "--no-r2"]],
                         ids=lambda a: " ".join(a))
def test_rotate_then_quantize(tmp_path, capsys, tiny_export, calib, argv):
    src = tiny_export / "model.onnx"
    out = tmp_path / "q.onnx"
    needs = argv != ["--method", "rtn"]
    assert main(["compile", str(src), "--rotate", *argv, *(calib if needs else []), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rotate (random_hadamard): R1 residual stream" in text and "float outputs unchanged to" in text
    online = sum(1 for n in onnx.load(str(out)).graph.node
                 if any(p.key == "ptqonnx.role" and p.value == "online_hadamard" for p in n.metadata_props))
    assert online == (0 if "--no-r4" in argv else 2 * 7)  # 7 nodes per online Hadamard, one per layer's down_proj
    plain = tmp_path / "plain.onnx"  # the same compile without the rotation, for scale
    assert main(["compile", str(src), *argv_without_rotation(argv), *(calib if needs else []), "-o", str(plain)]) == 0
    capsys.readouterr()
    ids = np.random.default_rng(0).integers(0, 300, size=(4, 24)).astype(np.int64)
    ref = run(src, {"input_ids": ids})[0]
    err = {p.name: float(np.linalg.norm(run(p, {"input_ids": ids})[0] - ref) / np.linalg.norm(ref))
           for p in (out, plain)}
    # random Gaussian weights have no outliers to remove: the rotated compile is about as good, not broken
    assert np.isfinite(list(err.values())).all() and err["q.onnx"] < 1.5 * err["plain.onnx"] + 0.02, err
    again = tmp_path / "again.onnx"
    assert main(["compile", str(src), "--recipe", str(tmp_path / "q.recipe.yaml"), "-o", str(again)]) == 0
    assert _sha(out) == _sha(again)


def test_rotated_statistics_are_measured_after_the_rotation(tiny_export, calib):
    """W8A8 after rotation: each activation grid covers the rotated activation (measured on the rotated
    graph), not the original one: the down_proj inputs' scales shrink with R4."""
    import ptqonnx
    from ptqonnx.config import CalibConfig

    cal = CalibConfig(text=calib[1], samples=4, seq_len=32)
    plain = ptqonnx.quantize(tiny_export / "model.onnx", recipe_for("rtn", w8a8=True), calibration=cal)
    rot = ptqonnx.quantize(tiny_export / "model.onnx", recipe_for("rtn", w8a8=True, rotate=True), calibration=cal)
    summary = rot.meta["ptqonnx.report"].summary(RotationSummary)
    assert summary.online == 2 and summary.heads == 2 and summary.fold_max_rel_err < 1e-5

    def scales(model):
        return {v.name: float(v.const_value.numpy()) for v in model.graph.initializers.values()
                if v.name.endswith("_act_scale")}

    assert len(scales(plain)) == len(scales(rot)) == 4 * 2 // 1  # q/k/v, o, gate/up, down inputs x 2 layers


def test_rotate_options_need_the_stage(tmp_path, capsys, tiny_export):
    assert main(["compile", str(tiny_export / "model.onnx"), "--no-r2", "-o", str(tmp_path / "q.onnx")]) == 2
    assert "--no-r2 applies to --rotate, not rtn" in capsys.readouterr().err
    assert main(["compile", str(tiny_export / "model.onnx"), "--method", "rotate"]) == 2
    assert "rotate is the --rotate flag" in capsys.readouterr().err
    with pytest.raises(Exception, match="seed must be non-negative"):
        RotateConfig(seed=-1)
