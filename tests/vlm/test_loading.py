"""Loading a hub-layout VLM checkpoint and running the benchmark on it."""

import pytest
import torch
from dlmcache.vlm.tiny import tiny_vlm

from tests.vlm.helpers import two_screenshot_batch


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_saved_checkpoint_loads_and_runs_the_benchmark(kind, processor, tmp_path):
    """The real-checkpoint path of scripts/bench_vlm.py (and the app) on a checkpoint written with the
    hub layout: config, safetensors weights, tokenizer, image processor, chat template."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dlmcache.vlm.loading import load_vlm

    model = tiny_vlm(processor, kind, seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    loaded, proc = load_vlm(str(tmp_path / "ckpt"), torch.float32)
    inp = two_screenshot_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inp).logits, model(**inp).logits)
    assert hasattr(proc, "image_processor")
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_vlm.py"), "--model", str(tmp_path / "ckpt"),
         "--dtype", "float32", "--size", "224x224", "--turns", "2", "--budgets", "0.25", "--repeats", "1",
         "--max-new-tokens", "3", "--calibration", "1", "--threads", "1", "--out", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert results["full, reused"]["top1_agreement"] == 1.0
    assert results["GUI-KV 25%"]["kv_ratio"] <= 0.3
    turns = results["GUI-KV 25%"]["per_turn"]
    assert len(turns) == 2 and turns[1]["seen_tokens"] > turns[0]["seen_tokens"]
    assert out.with_suffix(".png").exists()
