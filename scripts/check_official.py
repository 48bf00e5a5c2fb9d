"""Our models' logits against the official modeling code on the same random weights (CPU).

    python scripts/check_official.py --lladamoe /path/to/dinfer/tools
    python scripts/check_official.py --llada2 DIR [--llada2 DIR ...]

--lladamoe: a directory holding dInfer's `modeling_fused_lladamoe.py` and `configuration_lladamoe.py`
(inclusionAI/dInfer `tools/`; the hub ships LLaDA-MoE's code only as remote code, dInfer's copy is
its GitHub home). Its fused expert block needs vLLM's Triton kernel, so the reference runs with the
file's own unfused block (`LLaDAMoESparseMoeBlock`, the hub's parameter layout), put in place of the
fused one; `fuse_moe` is stubbed (never called), and transformers 5's RoPE registry gets back the
"default" rule the 4.x code looks up (`default_rope`). Everything else is the file as it is.

--llada2: a directory holding a copy of LLaDA2's hub modeling code: `modeling_llada2_moe.py` and
`configuration_llada2_moe.py` (LLaDA2.0's), or the same files of LLaDA2.1 named `*_llada21_moe.py`
(ZHZisZZ/dllm keeps both under `dllm/pipelines/llada2{,1}/models/`; the hub ships them as remote
code). Besides the logits, the release's own `generate` runs on the same random weights (float64,
greedy, no cache) beside ours (the engine, the finished blocks' KV cached: `dlmcache.testing.decode`): LLaDA2.0's
against `ThresholdScheduler`, LLaDA2.1's (with `editing_threshold`) against `TokenEditingScheduler`,
for prompts ending inside a block, on its edge and one token in, under a threshold that commits
several tokens a step and edit thresholds that edit; the tokens must be equal.

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
    reference = with_our_weights(official.FusedLLaDAMoEModelLM(config).eval(), ours)
    torch.manual_seed(3)
    ids = torch.randint(3, fields["vocab_size"], (2, 37))
    result = {"model": "LLaDAMoEModelLM", "official": f"{directory} (dInfer tools, unfused expert block)"}
    return result | compare_logits(ours, reference, lambda dtype: ours(ids).logits,
                                   lambda dtype: reference(input_ids=ids).logits)  # fmt: skip


def with_our_weights(reference, ours):
    """`reference` loaded with our state dict, every tensor matched (else the script stops, naming them)."""
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise SystemExit(f"check_official.py: state dicts differ: missing {missing}, unexpected {unexpected}")
    return reference


@torch.no_grad()
def compare_logits(ours, reference, our_logits, reference_logits) -> dict:
    """Both models in float32, then float64: whether `our_logits(dtype)` equals `reference_logits(dtype)`
    bit for bit, and their largest difference."""
    result = {}
    for dtype in (torch.float32, torch.float64):
        ours.to(dtype)
        reference.to(dtype)
        a, b = our_logits(dtype), reference_logits(dtype)
        name = str(dtype).replace("torch.", "")
        result[f"{name}_bit_identical"] = bool(torch.equal(a, b))
        result[f"{name}_max_abs_diff"] = float((a - b).abs().max())
    return result


def load_llada2(directory: Path):
    """LLaDA2's hub modeling module (2.0's or 2.1's files) imported as a package from a temporary copy."""
    for suffix in ("llada2_moe", "llada21_moe"):
        files = [directory / f"{kind}_{suffix}.py" for kind in ("modeling", "configuration")]
        if all(f.is_file() for f in files):
            break
    else:
        raise SystemExit(f"check_official.py: {directory} holds no modeling_llada2_moe.py / modeling_llada21_moe.py")
    package = Path(tempfile.mkdtemp()) / f"official_{suffix}"
    package.mkdir()
    for f in files:
        (package / f.name).write_text(f.read_text())
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(package.parent))
    default_rope()
    transformers_4_helpers()
    return importlib.import_module(f"{package.name}.modeling_{suffix}"), suffix


def transformers_4_helpers() -> None:
    """Two transformers 4.x names that LLaDA2.0's modeling file imports and transformers 5 dropped:
    `is_torch_fx_available` (answered False: no FX tracing here) and
    `is_torch_greater_or_equal_than_1_13` (True)."""
    import transformers.pytorch_utils
    import transformers.utils.import_utils

    if not hasattr(transformers.utils.import_utils, "is_torch_fx_available"):
        transformers.utils.import_utils.is_torch_fx_available = lambda: False
    if not hasattr(transformers.pytorch_utils, "is_torch_greater_or_equal_than_1_13"):
        transformers.pytorch_utils.is_torch_greater_or_equal_than_1_13 = True


def check_llada2(directory: Path) -> dict:
    import inspect

    from dlmcache.schedulers import ThresholdScheduler, TokenEditingScheduler
    from dlmcache.testing import block_causal_logits, decode, tiny_llada2

    official, suffix = load_llada2(directory)
    # weights at 10x the usual scale, so that thresholds commit several tokens and edits happen; the
    # mask token is never predicted (its output row is zero), on which the release's loop would spin
    ours = tiny_llada2(initializer_range=0.2, seed=2)
    with torch.no_grad():
        ours.lm_head.weight[ours.mask_token_id] = 0
    fields = ours.config.to_dict()
    config = official.LLaDA2MoeConfig(**{k: fields[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "use_qkv_bias", "use_qk_norm", "use_bias", "norm_head",
        "rms_norm_eps", "max_position_embeddings", "rope_theta", "partial_rotary_factor", "num_experts",
        "num_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
        "moe_intermediate_size", "first_k_dense_replace", "pad_token_id", "eos_token_id", "tie_word_embeddings",
    )})  # fmt: skip
    config._attn_implementation = "sdpa"
    reference = with_our_weights(official.LLaDA2MoeModelLM(config).eval(), ours)
    block = fields["block_size"]
    torch.manual_seed(3)
    ids = torch.randint(3, fields["vocab_size"], (2, 6 * block))
    n = ids.shape[1]
    blocks = torch.tril(torch.ones(n // block, n // block)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    result = {"model": "LLaDA2MoeModelLM", "official": f"{directory} ({suffix}, the hub's modeling file)"}

    def release_logits(dtype):  # the release's forward under its block mask (additive, in the model's dtype)
        mask = torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(blocks == 0, torch.finfo(dtype).min)
        return reference(input_ids=ids, attention_mask=mask, position_ids=torch.arange(n).expand(2, -1)).logits

    result |= compare_logits(ours, reference, lambda dtype: block_causal_logits(ours, ids, block), release_logits)

    # The release's generate against ours, float64, one prompt at a time. Its block mask is bfloat16,
    # which SDPA refuses beside float64 queries; the eager attention adds it to the scores.
    reference.config._attn_implementation = "eager"
    editing = "editing_threshold" in inspect.signature(reference.generate).parameters
    settings = [(0.3, 0.2, 16), (0.95, 0.0, 3), (0.5, 0.9, 16)] if editing else [(0.3,), (0.95,), (0.05,)]
    g = torch.Generator().manual_seed(0)
    cases, equal, edits = 0, 0, 0
    for setting in settings:
        for p_len, gen in ((6, 10), (8, 12), (5, 11)):
            prompt = torch.randint(3, 200, (p_len,), generator=g).tolist()
            kw = dict(temperature=0.0, block_length=block, steps=block, gen_length=gen, threshold=setting[0],
                      eos_id=fields["eos_token_id"], mask_id=ours.mask_token_id)  # fmt: skip
            if editing:
                kw.update(editing_threshold=setting[1], max_post_steps=setting[2])
                scheduler = TokenEditingScheduler(*setting)
            else:
                scheduler = ThresholdScheduler(setting[0])
            with torch.no_grad():
                want = reference.generate(torch.tensor([prompt]), **kw)[0].tolist()
            out = decode(ours, [prompt], gen, block, block, scheduler, eos_token_id=fields["eos_token_id"])
            got = out["sequences"][0].tolist()
            eos = fields["eos_token_id"]
            got = got[: got.index(eos) + 1] if eos in got else got  # the release returns up to its first EOS
            cases += 1
            equal += got == want
            edits += out["stats"][0].get("edited_tokens", 0)
    result.update(generate="2.1 (token editing)" if editing else "2.0", generate_cases=cases,
                  generate_equal=equal, generate_edited_tokens=edits)  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lladamoe", type=Path, help="dInfer's tools/ directory (LLaDA-MoE's modeling code)")
    ap.add_argument("--llada2", type=Path, action="append", default=[],
                    help="a directory with LLaDA2.0's or 2.1's hub modeling code (repeatable)")  # fmt: skip
    args = ap.parse_args()
    checks = [(check_lladamoe, args.lladamoe)] if args.lladamoe else []
    checks += [(check_llada2, d) for d in args.llada2]
    if not checks:
        raise SystemExit("check_official.py: give at least one official code directory (--lladamoe, --llada2)")
    torch.set_num_threads(1)
    failed = False
    for check, directory in checks:
        result = check(directory)
        print(json.dumps(result))
        failed |= not result["float32_bit_identical"]
        failed |= result.get("generate_equal", 0) != result.get("generate_cases", 0)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
