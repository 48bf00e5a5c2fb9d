"""The demo's logic without a browser: long answers, and a cancelled run stops decoding."""

import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")


@pytest.fixture(scope="module")
def demo():
    from app import Demo

    return Demo("dlmcache/tiny", "dlmcache/tiny-guide", "cpu", torch.float32)


def test_long_answers_give_a_table_not_a_division_by_zero(demo):
    """max_new_tokens >= 128 on the bundled model used to end in 'float division by zero' (the
    `none` row answering with EOS at once has 0 answer tokens/s)."""
    *_, last = demo.run("Compute 45+38-27.", 128, 32, 128, 0.0)
    table = last[-1]
    assert table.count("\n") == 4 and "| none |" in table
    from app import stats_table

    class Out:
        nfe, stats = 4, {"answer_tokens_per_second": 0.0, "answer_tokens": 0}

    assert stats_table([("none", "none", Out()), ("freecache", "freecache", Out())]).endswith("| - |")


def test_a_cancelled_run_stops_decoding(demo):
    """Closing the run (Gradio's cancel, or the browser leaving) used to leave the worker decoding
    for 12+ s; it now stops at the next denoising step."""
    run = demo.run("Compute 45+38-27.", 256, 32, 256, 0.0)
    next(run)
    next(run)
    t0 = time.perf_counter()
    run.close()
    assert not demo.worker.is_alive() and time.perf_counter() - t0 < 2.0
    assert demo.lock.acquire(blocking=False)  # the next run can start at once
    demo.lock.release()


def test_token_editing_is_offered_for_block_diffusion_only(demo):
    """The edit-threshold slider adds LLaDA2.1's token editing to the unguided panels of a block
    diffusion model, and a full-attention model refuses it in the page."""
    import gradio as gr
    from app import Demo

    with pytest.raises(gr.Error, match="block diffusion models"):
        demo.check("Compute 1+2.", 32, 32, 32, 0.0, edit_threshold=0.9)
    block = Demo("dlmcache/tiny-block", None, "cpu", torch.float32)
    assert block.modes(0.0, 0.9) == [("none", "none+edit_threshold=0.9"), ("freecache", "freecache+edit_threshold=0.9")]
    *_, last = block.run("Compute 45+38-27.", 16, 4, 16, 0.0, 0.9)
    assert "| freecache |" in last[-1]
