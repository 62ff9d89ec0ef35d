"""The optimum round trip: a compiled folder loads with `optimum.onnxruntime.ORTModelForCausalLM` and
`generate()` works, with and without optimum's cache handling.

`compile -o DIR/model.onnx` copies the input folder's config and tokenizer beside the output
(`ptqonnx.io.copy_companions`), so DIR is a model folder. optimum-onnx pins transformers 4.57, so it runs in
its own environment (`bash tests/optimum_env.sh`, which the README's test command runs; the test is skipped,
saying so, where that environment is missing). There, `AutoTokenizer` loads DIR's tokenizer and must give
the ids this project's tokenizer gives; `generate()` (greedy) must give the tokens an independent greedy loop
gives: full-sequence prefills of the same compiled file in ONNX Runtime, no cache involved. For a KV-cache
model optimum feeds the cache back one token at a time, so equal tokens mean its cache handling works on our
quantized graph.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from graphs import compile_cli, prefill_logits

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]
PROMPT = "the cat sat on the"
NEW_TOKENS = 6

GENERATE = r"""
import json, sys
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, use_cache, ids, prompt = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3]), sys.argv[4]
tok_ids = None
if prompt:
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(prompt, return_tensors="pt")
    tok_ids = enc["input_ids"][0].tolist()
model = ORTModelForCausalLM.from_pretrained(folder, use_cache=use_cache, use_io_binding=False)
x = torch.tensor([ids])
out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=int(sys.argv[5]),
                     min_new_tokens=int(sys.argv[5]), do_sample=False)
print(json.dumps({"tokenizer_ids": tok_ids, "generated": out[0].tolist()[len(ids):],
                  "model_inputs": sorted(i.name for i in model.session.get_inputs())}))
"""


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    env = Path(os.environ.get("PTQONNX_OPTIMUM_ENV", ROOT / ".venv-optimum"))
    python = env / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no optimum environment at {env}: run `bash tests/optimum_env.sh` (the README's test command does)")
    return python


def _greedy(path: Path, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens by full-sequence prefills (an empty cache each time) of `path` in ONNX Runtime."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(prefill_logits(path, np.array([seq], np.int64))[0, -1].argmax()))
    return seq[len(ids):]


def _generate(python: Path, folder: Path, use_cache: bool, ids: list[int], prompt: str) -> dict:
    res = subprocess.run([str(python), "-c", GENERATE, str(folder), "1" if use_cache else "0", json.dumps(ids),
                          prompt, str(NEW_TOKENS)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["ours-kv-gptq", "ours-nocache-rtn", "optimum-with-past-awq"])
def test_optimum_generates_with_our_output(case: str, optimum_python: Path, tiny_export: Path, calib_text: Path,
                                           tmp_path: Path) -> None:
    from ptqonnx.text import load_tokenizer

    source, method = {
        "ours-kv-gptq": (tiny_export / "model_kv.onnx", ["--method", "gptq"]),
        "ours-nocache-rtn": (tiny_export / "model.onnx", ["--method", "rtn"]),
        "optimum-with-past-awq": (FIXTURES / "optimum_llama" / "model.onnx", ["--method", "awq", "--awq-grid", "5"]),
    }[case]
    calib = [] if method[1] == "rtn" else ["--calib-text", str(calib_text), *CALIB]
    out = compile_cli(source, tmp_path / "out" / "model.onnx", *method, *calib)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out.parent / name).read_bytes() == (source.parent / name).read_bytes()
    ids = load_tokenizer(tiny_export).encode(PROMPT).ids
    # the optimum fixture's tokenizer_config.json was written by transformers 5 (TokenizersBackend), which 4.57
    # cannot load: there the ids are fed without optimum's tokenizer
    ours = case.startswith("ours")
    got = _generate(optimum_python, out.parent, "nocache" not in case, ids, PROMPT if ours else "")
    if ours:
        assert got["tokenizer_ids"] == ids
    if "nocache" not in case:
        assert any(n.startswith("past_key_values") for n in got["model_inputs"])  # optimum drives the cache
    assert got["generated"] == _greedy(out, ids, NEW_TOKENS)
