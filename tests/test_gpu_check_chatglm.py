"""benchmarks/gpu_check.py: imports nothing of Ray / DeepSpeed / webdataset, and its synthetic batches are valid.

The full step is rehearsed by hand on CPU (``--rehearsal``, benchmarks/RESULTS.md "GPU check"): at ChatGLM3-6B
width one layer takes minutes on 2 cores, too long for CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import sys
sys.argv = ["gpu_check.py"]
sys.path.insert(0, "benchmarks")
import gpu_check as g
loaded = sorted(m for m in sys.modules if m.split(".")[0] in g.BLOCKED)
assert not loaded, loaded
for name in g.BLOCKED:
    try:
        __import__(name)
    except ImportError as e:
        assert "must not be imported" in str(e), e
    else:
        raise AssertionError(name + " imported")
import numpy as np
a = g.parse(["--out", "x.json", "--rehearsal"])
batch, text = g.synthetic_micro_batch(np.random.default_rng(0), a)
t = batch["prompt_input_ids"].shape[1]
assert t == a.max_prompt + a.max_target + 1
for i in range(a.micro_batch):
    n = int(batch["prompt_attention_mask"][i].sum())
    last = int(batch["prompt_last_index"][i])
    lab = batch["prompt_labels"][i]
    assert batch["prompt_input_ids"][i, :2].tolist() == [g.GMASK, g.SOP]
    assert (lab[: last + 1] == -100).all() and (lab[last + 1: n] != -100).all() and (lab[n:] == -100).all()
    assert int(batch["prompt_input_ids"][i, n - 1]) == g.EOS and a.min_instruction <= last + 1 <= a.max_prompt
ids = text.text_ids
assert (ids[1:] > ids[:-1]).all() and int(ids[0]) > 0
assert (text.input_ids[:, :2] == g.torch.tensor([g.GMASK, g.SOP])).all()
assert int(text.attention_mask.sum(1).max()) == text.input_ids.shape[1]
print("ok", len(ids))
"""


def test_gpu_check_blocks_heavy_imports_and_builds_valid_batches():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
