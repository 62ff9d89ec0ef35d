"""The README's Python example runs verbatim (on the tiny model standing in for SmolLM2's export)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"README has no ```python block after <!-- {marker} -->"
    return found.group(1)


def test_readme_python_example_runs_verbatim(tmp_path, tiny_export, monkeypatch, capsys):
    from ptqonnx.models.tiny import tiny_corpus

    checkout = tmp_path / "checkout"
    shutil.copytree(tiny_export, checkout / "work" / "smollm2")
    calib = tmp_path / "shared" / "data" / "wikitext-2-calib" / "valid.txt"
    calib.parent.mkdir(parents=True)
    calib.write_text(" ".join(tiny_corpus(4000, seed=11)))
    monkeypatch.chdir(checkout)
    exec(compile(_block("python-example"), "README.md", "exec"), {})
    out = checkout / "work" / "smollm2" / "model.awq_gptq.onnx"
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulNBits") == 14  # 2 layers x 7; the LM head kept in float
    assert "quantized 14 linear layers" in capsys.readouterr().out
