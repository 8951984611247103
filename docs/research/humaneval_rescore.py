"""HumanEval pass@1 of plain decoding, scored by the sandbox before issue 39 (exit status 0 = pass) and by today's
(`lede.eval.sandbox`: a boundary, and a pass only with the end-of-program token): honest completions must score
the same. The old harness is read from git (commit f0b52ee) into a temporary module.

    python docs/research/humaneval_rescore.py --problems 20 --out results/humaneval_rescore.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lede import Autoregressive, Decoder, load_model
from lede.core.io import atomic_write_text
from lede.eval.sandbox import check_humaneval
from lede.eval.tasks.utils import _humaneval_docs

REPO = Path(__file__).resolve().parents[2]


def old_sandbox():
    src = subprocess.run(["git", "-C", str(REPO), "show", "f0b52ee:src/lede/sandbox.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/humaneval_rescore.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model("smollm2-135m", dtype="float32", device="cpu", kernels="lede", cache_dir=REPO / "resources/models")
    dec, old = Decoder(lm), old_sandbox()
    rows = []
    for doc in _humaneval_docs()[: a.problems]:
        text = f"Complete the following Python function:\n```python\n{doc['prompt']}```"  # lede_humaneval's doc_to_text
        out = dec.generate(lm.encode_chat(text), Autoregressive(), max_new_tokens=a.max_new_tokens)
        t = time.perf_counter()
        new = check_humaneval(doc["prompt"], out.text, doc["test"], doc["entry_point"], timeout_s=10.0, memory_mb=1024)
        new_s = time.perf_counter() - t
        before = old.check_humaneval(doc["prompt"], out.text, doc["test"], doc["entry_point"], timeout_s=10.0,
                                     memory_mb=1024)
        rows.append({"task_id": doc["task_id"], "new": new.passed, "old": before.passed, "tokens": out.new_tokens,
                     "containment": new.containment, "new_check_s": round(new_s, 2)})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"problems": len(rows), "pass@1_new": sum(r["new"] for r in rows) / len(rows),
               "pass@1_old": sum(r["old"] for r in rows) / len(rows),
               "disagreements": [r["task_id"] for r in rows if r["new"] != r["old"]]}
    print(json.dumps(summary))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
