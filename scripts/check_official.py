"""Our models' logits against the official modeling code on the same random weights (CPU).

    python scripts/check_official.py --lladamoe /path/to/dinfer/tools

--lladamoe: a directory holding dInfer's `modeling_fused_lladamoe.py` and `configuration_lladamoe.py`
(inclusionAI/dInfer `tools/`; the hub ships LLaDA-MoE's code only as remote code, dInfer's copy is
its GitHub home). Its fused expert block needs vLLM's Triton kernel, so the reference runs with the
file's own unfused block (`LLaDAMoESparseMoeBlock`, the hub's parameter layout), put in place of the
fused one; `fuse_moe` is stubbed (never called), and transformers 5's RoPE registry gets back the
"default" rule the 4.x code looks up (`default_rope`). Everything else is the file as it is.

For each model: a tiny random config (`dlmcache.testing`), our model built from it, the official
model loaded with our state dict (strict), and the logits of random ids compared in float32 (bit for
bit, or the largest difference) and float64 (where the official code keeps its RoPE tables in
float32, so the two differ by float32 rounding). Prints one JSON line per model; exits 1 unless
float32 is bit-identical.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch


def default_rope() -> None:
    """transformers 5 dropped the "default" entry of `ROPE_INIT_FUNCTIONS` that code written for 4.x
    looks up; put back the standard rule: inv_freq = base^(-2i/dim) over dim = head_dim x
    partial_rotary_factor, attention scaling 1."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def default(config, device=None, seq_len=None, **kwargs):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (config.rope_theta**exponent), 1.0

    ROPE_INIT_FUNCTIONS.setdefault("default", default)


def load_dinfer_lladamoe(directory: Path):
    """dInfer's LLaDA-MoE modeling module, imported as a package from a temporary copy."""
    package = Path(tempfile.mkdtemp()) / "official_lladamoe"
    package.mkdir()
    for name in ("modeling_fused_lladamoe.py", "configuration_lladamoe.py"):
        source = directory / name
        if not source.is_file():
            raise SystemExit(f"check_official.py: {source} is missing")
        (package / name).write_text(source.read_text())
    (package / "__init__.py").write_text("")
    (package / "fuse_moe.py").write_text("def fused_moe(*args, **kwargs):\n    raise NotImplementedError\n")
    sys.path.insert(0, str(package.parent))
    default_rope()
    module = importlib.import_module("official_lladamoe.modeling_fused_lladamoe")
    module.FusedLLaDAMoESparseMoeBlock = module.LLaDAMoESparseMoeBlock  # the unfused block, hub layout
    return module


def check_lladamoe(directory: Path) -> dict:
    from dlmcache.testing import tiny_llada_moe

    official = load_dinfer_lladamoe(directory)
    ours = tiny_llada_moe()
    fields = ours.config.to_dict()
    config = official.LLaDAConfig(
        **{k: fields[k] for k in (
            "vocab_size", "hidden_size", "dense_intermediate_size", "expert_intermediate_size",
            "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "num_experts",
            "num_experts_per_tok", "qk_layernorm", "moe_layer_freq", "pad_token_id", "eos_token_id",
        )},
        moe_router_enable_expert_bias=False, moe_router_score_function="softmax", norm_topk_prob=False,
        attention_bias=False, clip_qkv=None, rope_scaling=None,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    reference = official.FusedLLaDAMoEModelLM(config).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"check_official.py: state dicts differ: missing {missing}, unexpected {unexpected}")
    torch.manual_seed(3)
    ids = torch.randint(3, fields["vocab_size"], (2, 37))
    result = {"model": "LLaDAMoEModelLM", "official": f"{directory} (dInfer tools, unfused expert block)"}
    for dtype in (torch.float32, torch.float64):
        ours.to(dtype)
        reference.to(dtype)
        with torch.no_grad():
            a = ours(ids).logits
            b = reference(input_ids=ids).logits
        name = str(dtype).replace("torch.", "")
        result[f"{name}_bit_identical"] = bool(torch.equal(a, b))
        result[f"{name}_max_abs_diff"] = float((a - b).abs().max())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lladamoe", type=Path, help="dInfer's tools/ directory (LLaDA-MoE's modeling code)")
    args = ap.parse_args()
    if args.lladamoe is None:
        raise SystemExit("check_official.py: give at least one official code directory (--lladamoe)")
    torch.set_num_threads(1)
    failed = False
    for check, directory in ((check_lladamoe, args.lladamoe),):
        result = check(directory)
        print(json.dumps(result))
        failed |= not result["float32_bit_identical"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
