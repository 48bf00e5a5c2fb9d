"""Tiny random models, hub-layout checkpoints and an independent reference forward for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlmcache.testing import (  # noqa: F401 (the tests' models and checkpoints)
    DREAM_HUB_FIELDS,
    LLADA_HUB_FIELDS,
    random_checkpoint,
    tiny_dream,
    tiny_llada,
    tiny_llama,
    write_checkpoint,
)

# The hub-layout writer lives in the package (`dlmcache.testing`), for the benchmarks too.
write_hub_checkpoint = write_checkpoint


def reference_forward(state: dict, config, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None):
    """An independent, deliberately plain forward from the raw state dict (float64): the architecture
    as the papers describe it. Returns logits [B, n, V] with Dream's shift applied."""
    sd = {k: v.double() for k, v in state.items()}
    llada = config.model_type == "llada"
    if llada:
        pre, n_layers, n_heads, n_kv = "model.transformer.", config.n_layers, config.n_heads, config.n_kv_heads
        emb, d, theta, eps = sd[pre + "wte.weight"], config.d_model, config.rope_theta, config.rms_norm_eps
    else:
        pre, n_layers = "model.", config.num_hidden_layers
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        emb, d, theta, eps = sd[pre + "embed_tokens.weight"], config.hidden_size, config.rope_theta, config.rms_norm_eps
    hd = d // n_heads
    b, n = input_ids.shape
    if key_mask is None:
        key_mask = torch.ones(b, n, dtype=torch.bool)
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0).double()

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x):  # x [B, H, n, hd]; pair dim i with dim i + hd/2
        freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos[:, None, :, None] * freqs
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)

    def lin(x, name, bias=False):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if bias else y

    h = emb[input_ids]
    for i in range(n_layers):
        if llada:
            p = f"{pre}blocks.{i}."
            names = dict(
                n1=p + "attn_norm",
                q=p + "q_proj",
                k=p + "k_proj",
                v=p + "v_proj",
                o=p + "attn_out",
                n2=p + "ff_norm",
                gate=p + "ff_proj",
                up=p + "up_proj",
                down=p + "ff_out",
            )
        else:
            p = f"{pre}layers.{i}."
            names = dict(
                n1=p + "input_layernorm",
                q=p + "self_attn.q_proj",
                k=p + "self_attn.k_proj",
                v=p + "self_attn.v_proj",
                o=p + "self_attn.o_proj",
                n2=p + "post_attention_layernorm",
                gate=p + "mlp.gate_proj",
                up=p + "mlp.up_proj",
                down=p + "mlp.down_proj",
            )
        x = rms(h, sd[names["n1"] + ".weight"])
        q = lin(x, names["q"], not llada).view(b, n, n_heads, hd).transpose(1, 2)
        k = lin(x, names["k"], not llada).view(b, n, n_kv, hd).transpose(1, 2)
        v = lin(x, names["v"], not llada).view(b, n, n_kv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        h = h + lin(att, names["o"])
        x = rms(h, sd[names["n2"] + ".weight"])
        h = h + lin(F.silu(lin(x, names["gate"])) * lin(x, names["up"]), names["down"])
    if llada:
        logits = lin(rms(h, sd[pre + "ln_f.weight"]), pre + "ff_out")
    else:
        logits = lin(rms(h, sd[pre + "norm.weight"]), "lm_head")
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits


def step_costs(decoder, warm_steps: int) -> tuple[int, int]:
    """(dispatched ops, host reads) of `decoder`'s step after `warm_steps` steps: the engine's
    ops-per-step tests, at 1 and at 16 requests."""
    from dlmcache.testing import DispatchCount

    for _ in range(warm_steps):
        decoder.step()
    reads = decoder.batch.host_reads
    with DispatchCount() as count:
        decoder.step()
    return count.ops, decoder.batch.host_reads - reads


def trace(pipe, prompt, cache, **kw) -> list[dict]:
    """`prompt` decoded alone on the engine, step by step: per step, the canvas before it ("canvas",
    [L]: prompt and generated region, masks where nothing is committed), the positions it feeds
    ("fed", sorted) and the logits it computes ("logits" [M, V], one row per still-masked position of
    the active block, in position order). `kw`: the pipeline call's settings."""
    from dlmcache.engine import BatchedDecoder

    (request,) = pipe.make_requests(prompt, cache=cache, **kw)
    mask_id = pipe.mask_token_id
    canvas = torch.tensor(request.prompt + [mask_id] * request.max_new_tokens)
    p = len(request.prompt)

    def on_step(sequence, commit_step):
        canvas[p:] = sequence

    request.on_step = on_step
    decoder = BatchedDecoder.for_requests(pipe.model, pipe.tokenizer.eos_token_id, [request])
    decoder.add(request)
    steps, forward = [], decoder._forward

    def spy(step, store):
        logits, values = forward(step, store)
        steps.append({"canvas": canvas.clone(), "fed": sorted(step.positions.tolist()), "logits": logits})
        return logits, values

    decoder._forward = spy
    while len(decoder):
        decoder.step()
    return steps


def run_script(name: str, *argv: str) -> None:
    """scripts/NAME with `argv`, as `python scripts/NAME ...` would, in this process (imports paid once;
    its torch thread count restored after). A failing exit (or --help's) raises its SystemExit."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / name
    threads, old_argv = torch.get_num_threads(), sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0) or "--help" in argv:
            raise
    finally:
        sys.argv = old_argv
        torch.set_num_threads(threads)
