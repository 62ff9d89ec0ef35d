"""YAML recipes: loaded strictly (unknown key, wrong type, bad value, impossible stage order = one line naming
the file and line), written beside every output as the recipe actually run, and re-run to the same bytes."""

from __future__ import annotations

import hashlib
import textwrap

import pytest

from graphs import linear_model, save
from ptqonnx.cli import main
from ptqonnx.config import AwqConfig, GptqConfig, Recipe, RtnConfig, SmoothQuantConfig, W8A8Config
from ptqonnx.errors import UserError
from ptqonnx.recipe import dump_recipe, load_recipe, recipe_from_dict


def _write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_issue_examples_load():
    r = recipe_from_dict({"stages": [{"smoothquant": {"alpha": 0.5}}, {"gptq": {"bits": 8}}, {"w8a8": {}}],
                          "target": "tensorrt", "exclude": ["*down_proj*"]})
    # target tensorrt (W8A8's default): the weights' grid resolves to positive scales
    assert r.stages == (SmoothQuantConfig(alpha=0.5), GptqConfig(bits=8, group_size=None, scales="positive"),
                        W8A8Config())
    assert r.exclude == ("*down_proj*",) and r.format == "qdq" and r.method == "smoothquant+gptq"
    r = recipe_from_dict({"stages": [{"awq": {}}, {"gptq": {"act_order": True}}]})
    assert r.stages == (AwqConfig(), GptqConfig()) and r.method == "awq+gptq" and r.format == "matmulnbits"
    assert recipe_from_dict({"stages": ["awq"]}).stages == (AwqConfig(), RtnConfig())  # weights implied


@pytest.mark.parametrize("text,message", [
    ("stages:\n  - gptq: {bits: 4, dampp: 0.1}\n", "r.yaml:2: unknown key 'dampp' in stage gptq; its keys: bits,"),
    ("stages:\n  - gptq:\n      bits: four\n", "r.yaml:3: gptq.bits must be an integer, got 'four'"),
    ("stages:\n  - gptq:\n      damp: 2\n", "r.yaml:3: gptq.damp must be in (0, 1), got 2.0"),
    ("stages:\n  - gptq\n  - awq\n", "r.yaml:1: stage awq cannot follow gptq in stages"),
    ("stages:\n  - hqq\n", "r.yaml:2: unknown stage 'hqq'; stages: rotate, rtn, gptq, awq, smoothquant, w8a8"),
    ("stages: [rtn]\nformatt: qdq\n", "r.yaml:2: unknown key 'formatt'; recipe keys:"),
    ("stages: [rtn]\nformat: int4\n", "r.yaml:2: format must be one of matmulnbits, qdq, got 'int4'"),
    ("stages: [smoothquant]\n", "r.yaml:1: smoothquant emits W8A8; add a w8a8 stage"),
    ("stages:\n  - smoothquant\n  - w8a8: {target: tensorrt}\n",
     "r.yaml:3: unknown key 'target' in stage w8a8; target is a recipe-level key: write it at the top level"),
    ("stages:\n  - rtn\n  - w8a8:\n      act_scales: dynamic\n",
     "r.yaml:4: dynamic activation scales run in ONNX Runtime's CPU int8 MatMulNBits kernel only"),
    ("stages: [awq, gptq: {sequential: false}]\n", "awq+gptq always calibrates block by block: drop gptq.sequential"),
    ("stages: [rtn]\nexclude: '*down*'\n", "r.yaml:2: exclude must be a list of strings, got '*down*'"),
    ("stages: [rtn]\nkeep_lm_head: yes please\n", "r.yaml:2: keep_lm_head must be true or false"),
    ("stages: []\n", "`stages` must be a non-empty list"),
    ("stages: [rtn]\nversion: 4\n", "recipe version 4 is not supported"),
    ("stages: [gptq]\ncalibration: {text: a.txt, npz: b.npz}\n", "r.yaml:2: pass either calibration.text or"),
    ("stages: [gptq]\ncalibration: {samples: 0}\n", "r.yaml:2: calibration.samples must be at least 1"),
    ("stages: [rtn\n", "r.yaml:2: not valid YAML"),
    ("- rtn\n", "a recipe is a mapping with a `stages` list"),
    ("stages: [rtn]\nstages: [gptq]\n", "r.yaml:2: key 'stages' appears twice"),
])
def test_bad_recipes_are_one_line_naming_the_line(tmp_path, text, message):
    with pytest.raises(UserError) as exc:
        load_recipe(_write(tmp_path, text))
    msg = str(exc.value)
    assert message in msg and "\n" not in msg, msg


def test_dump_and_load_round_trip(tmp_path):
    from ptqonnx.config import CalibConfig

    recipe = Recipe((SmoothQuantConfig(alpha="auto"), GptqConfig(bits=8, group_size=None, damp=0.02),
                     W8A8Config(dynamic_layers=("*down_proj*",), calib_range="percentile")), target="ort-cpu",
                    exclude=("lm_head*",), calibration=CalibConfig(text=tmp_path / "c.txt", samples=7))
    p = tmp_path / "x.yaml"
    p.write_text(dump_recipe(recipe))
    assert load_recipe(p) == recipe
    assert p.read_text().startswith("# ptqonnx ")


def test_cli_recipe_flag_refuses_method_flags_and_runs(tmp_path, capsys):
    src = save(linear_model(64, 16)[0], tmp_path / "m.onnx")
    rec = _write(tmp_path, "stages:\n  - rtn: {bits: 4, group_size: 32}\nformat: qdq\n")
    assert main(["compile", str(src), "--recipe", str(rec), "--damp", "0.1"]) == 2
    assert "--recipe describes the whole compile; drop --damp" in capsys.readouterr().err
    assert main(["compile", str(src), "--recipe", str(rec), "-o", str(tmp_path / "q.onnx")]) == 0
    written = load_recipe(tmp_path / "q.recipe.yaml")
    assert written == load_recipe(rec) and written.format == "qdq" and written.weights.group_size == 32


@pytest.mark.parametrize("argv", [
    ["--method", "rtn", "--group-size", "32", "--quantize-embeddings"],
    ["--method", "rtn", "--asym", "--format", "qdq", "--exclude", "*down_proj*"],
    ["--method", "gptq", "--wbits", "3", "--asym"],
    ["--method", "gptq", "--one-shot", "--no-act-order"],
    ["--method", "awq+gptq", "--group-size", "32"],
    ["--method", "smoothquant", "--w8a8", "--target", "ort-cpu", "--alpha", "auto"],
    ["--method", "smoothquant", "--w8a8", "--target", "ort-cpu", "--dynamic-layers", "*down_proj*"],
    ["--method", "smoothquant+gptq", "--w8a8", "--quantize-bmm"],
], ids=lambda a: " ".join(a))
def test_every_compile_writes_a_recipe_that_reproduces_it(tmp_path, capsys, tiny_export, argv):
    from ptqonnx.models.tiny import tiny_corpus

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_corpus(800, seed=4)))
    calib = ["--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "32"]
    needs = any(m in argv for m in ("gptq", "awq+gptq")) or "--w8a8" in argv
    src = tiny_export / "model.onnx"
    first = tmp_path / "first.onnx"
    assert main(["compile", str(src), *argv, *(calib if needs else []), "-o", str(first)]) == 0, capsys.readouterr()
    again = tmp_path / "again.onnx"
    assert main(["compile", str(src), "--recipe", str(tmp_path / "first.recipe.yaml"), "-o", str(again)]) == 0
    assert _sha(first) == _sha(again)
    assert (tmp_path / "first.recipe.yaml").read_text() == (tmp_path / "again.recipe.yaml").read_text()


@pytest.mark.parametrize("field,text,expected", [
    # recipes written before keep_cache_values (version 1) never rotated or scaled V where a KV cache stores it
    ("keep_cache_values", "version: 1\nstages: [rotate, rtn]\n", True),
    ("keep_cache_values", "version: 1\nstages: [awq]\nkeep_cache_values: false\n", False),
    ("keep_cache_values", "version: 2\nstages: [rotate, rtn]\n", False),
    ("keep_cache_values", "stages: [rotate, rtn]\n", False),
    # Conv layers were never quantized before version 3
    ("keep_conv", "version: 1\nstages: [rtn]\n", True),
    ("keep_conv", "version: 2\nstages: [rtn]\n", True),
    ("keep_conv", "version: 2\nstages: [rtn]\nkeep_conv: false\n", False),
    ("keep_conv", "version: 3\nstages: [rtn]\n", False),
    ("keep_conv", "stages: [rtn]\n", False),
])
def test_older_recipe_versions_read_as_they_compiled(tmp_path, field, text, expected):
    """A recipe of an earlier version reads with the defaults of its version (so it compiles the same bytes
    again); the current version and hand-written recipes without one get today's defaults; an explicit value
    wins in both."""
    from ptqonnx.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert getattr(load_recipe(path), field) is expected
