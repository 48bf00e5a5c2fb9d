import json

import pytest
import torch

from dlmcache import DLMPipeline, DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from dlmcache.models import SDARForCausalLM, SDARMoeForCausalLM
from dlmcache.models.layers import Linear, onednn_dtypes
from tests.helpers import reference_forward, tiny_dream, tiny_llada, write_hub_checkpoint

BUILDERS = {"llada": tiny_llada, "dream": tiny_dream}


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_forward_matches_independent_reference(arch, tiny_tokenizer):
    model = BUILDERS[arch](tiny_tokenizer).double()
    ids = torch.randint(5, len(tiny_tokenizer), (2, 11))
    with torch.no_grad():
        ours = model(ids).logits
    ref = reference_forward(model.state_dict(), model.config, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_left_padding_matches_unpadded(arch, tiny_tokenizer):
    """The attention mask is honoured: a left-padded row gives the logits of the row alone."""
    model = BUILDERS[arch](tiny_tokenizer)
    short, long_ = torch.randint(5, 280, (1, 6)), torch.randint(5, 280, (1, 10))
    batch = torch.cat([torch.cat([torch.full((1, 4), tiny_tokenizer.pad_token_id), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone = model(short).logits
    skip = model.logit_shift  # Dream predicts the first real token from the padding before it
    torch.testing.assert_close(padded[0, 4 + skip :], alone[0, skip:], rtol=1e-5, atol=1e-5)
    ref = reference_forward(model.state_dict(), model.config, batch, mask.bool())
    torch.testing.assert_close(padded[1], ref[1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_positions_are_relative_under_rope(arch, tiny_tokenizer):
    """Shifting every position by a constant leaves bidirectional RoPE attention unchanged."""
    model = BUILDERS[arch](tiny_tokenizer).double()
    ids = torch.randint(5, 280, (1, 9))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        a = model(ids, positions=pos).logits
        b = model(ids, positions=pos + 37).logits
        c = model(ids, positions=pos.flip(-1)).logits
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(a, c)


def test_dream_logits_are_shifted(tiny_tokenizer):
    model = tiny_dream(tiny_tokenizer)
    ids = torch.randint(5, 280, (2, 8))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        shifted = model(ids).logits
        picked = model(ids, logits_index=torch.tensor([0, 3, 7])).logits
    raw = model.lm_head(hidden)
    torch.testing.assert_close(shifted[:, 1:], raw[:, :-1])
    torch.testing.assert_close(shifted[:, 0], raw[:, 0])
    torch.testing.assert_close(picked, shifted[:, [0, 3, 7]])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_bf16_close_to_fp32(arch, tiny_tokenizer):
    model = BUILDERS[arch](tiny_tokenizer)
    ids = torch.randint(5, 280, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_loads_sharded_hub_layout(arch, tiny_tokenizer, tmp_path):
    model = BUILDERS[arch](tiny_tokenizer)
    path = write_hub_checkpoint(model, tmp_path / arch, tiny_tokenizer)
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) == len(model.state_dict())
    pipe = DLMPipeline.from_pretrained(path)
    assert type(pipe.model) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], v), k
    bf16 = DLMPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16


def test_hub_weight_names(tiny_tokenizer):
    llada = set(tiny_llada(tiny_tokenizer, n_layers=1).state_dict())
    assert llada == {
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
        *(
            f"model.transformer.blocks.0.{n}.weight"
            for n in ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
        ),
    }
    dream = set(tiny_dream(tiny_tokenizer, num_hidden_layers=1).state_dict())
    layer = "model.layers.0."
    assert dream == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        layer + "input_layernorm.weight",
        layer + "post_attention_layernorm.weight",
        *(f"{layer}self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")),
        layer + "self_attn.o_proj.weight",
        *(f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }


def test_release_defaults():
    llada, dream = LLaDAConfig(), DreamConfig()
    assert (llada.d_model, llada.n_layers, llada.n_heads, llada.mlp_hidden_size, llada.mask_token_id) == (
        4096,
        32,
        32,
        12288,
        126336,
    )
    assert llada.rope_theta == 500000.0 and llada.vocab_size == 126464
    assert (dream.hidden_size, dream.num_hidden_layers, dream.num_key_value_heads, dream.mask_token_id) == (
        3584,
        28,
        4,
        151666,
    )
    assert dream.rope_theta == 1e6 and dream.rms_norm_eps == 1e-6


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (LLaDAConfig, {"d_model": 65, "n_heads": 4}, "d_model=65"),
        (LLaDAConfig, {"d_model": 48, "n_heads": 6, "n_kv_heads": 4}, "n_kv_heads=4"),
        (LLaDAConfig, {"block_type": "sequential"}, "block_type='sequential'"),
        (LLaDAConfig, {"weight_tying": True}, "weight_tying=True"),
        (DreamConfig, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (DreamConfig, {"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 48}, "num_key_value_heads=4"),
        (DreamConfig, {"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
    ],
)
def test_bad_configs_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def _edit_checkpoint(path, edit_tensors=None, edit_config=None):
    """Rewrite a hub-layout checkpoint: `edit_tensors(dict)` on the merged tensors (written back as
    one file), `edit_config(dict)` on config.json."""
    from safetensors.torch import load_file, save_file

    if edit_tensors is not None:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        tensors = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(path / shard)))
            (path / shard).unlink()
        (path / "model.safetensors.index.json").unlink()
        edit_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))


def _swap_to_other_architecture(config):
    """A config labelled with the other architecture's model_type, keeping its own fields."""
    config["model_type"] = "Dream" if config["model_type"] == "llada" else "llada"


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize(
    "edit_tensors, edit_config, match",
    [
        (lambda t: t.pop(sorted(t)[1]), None, r"missing tensors \['model\."),
        (lambda t: t.update(extra=torch.zeros(3)), None, r"unexpected tensors \['extra'\]"),
        (lambda t: t.update({k: t[k].long() for k in sorted(t)[:1]}), None, r"is I64, weights must be floating point"),
        (
            lambda t: t.update({k: t[k][:-1] for k in sorted(t)[:1]}),
            None,
            r"has shape \[\d+(, \d+)?\], the config needs",
        ),
        (
            None,
            _swap_to_other_architecture,
            r"model_type='(Dream|llada)'(, not| lacks \[.*\] and has fields of another architecture)",
        ),
        (None, lambda c: c.update(mask_token_id=10**6), r"mask_token_id=1000000 is outside the vocabulary"),
        (None, lambda c: c.update(eos_token_id=-1), r"eos_token_id=-1 is outside the vocabulary"),
    ],
)
def test_loading_is_strict(arch, edit_tensors, edit_config, match, tiny_tokenizer, tmp_path):
    """What used to load silently (missing / unexpected / integer tensors, a config of another
    architecture: a "Dream" config with LLaDA fields built a 7B model and was OOM-killed) or fail only
    at generate time (a mask id outside the vocabulary) is a ValueError naming the tensor or field."""
    path = write_hub_checkpoint(BUILDERS[arch](tiny_tokenizer), tmp_path / arch, tiny_tokenizer)
    _edit_checkpoint(path, edit_tensors, edit_config)
    with pytest.raises(ValueError, match=match):
        DLMPipeline.from_pretrained(path)
    with pytest.raises(ValueError, match=match):
        (LLaDAModelLM if arch == "llada" else DreamModel).from_pretrained(path)


def test_a_path_that_does_not_exist_is_named(tmp_path):
    for missing in (tmp_path / "nope", "./no/such/dir", "~/no-such-model"):
        with pytest.raises(FileNotFoundError, match="no such local file or directory"):
            DLMPipeline.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no such local file"):
        LLaDAModelLM.from_pretrained(str(tmp_path / "nope"))


def test_model_classes_are_registered():
    from dlmcache.models import MODEL_CLASSES, FastDLLMV2ForCausalLM, LLaDA2MoeModelLM

    assert MODEL_CLASSES == {
        "llada": LLaDAModelLM,
        "Dream": DreamModel,
        "sdar": SDARForCausalLM,
        "sdar_moe": SDARMoeForCausalLM,
        "llada2_moe": LLaDA2MoeModelLM,
        "Fast_dLLM_Qwen": FastDLLMV2ForCausalLM,
    }


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_kernels_attention_backend_matches_sdpa(arch, tiny_tokenizer):
    """The models' attention through `kernels.ops.attention` (Triton; the interpreter on CPU), with a
    padded batch, equals torch SDPA (the engine's paged kernel: test_engine)."""
    model = BUILDERS[arch](tiny_tokenizer)
    ids = torch.randint(5, 280, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(ids, positions=pos, attention_mask=mask).logits
        model.set_attention_backend("triton")
        got = model(ids, positions=pos, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 3:], want[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        model.set_attention_backend("flash")


onednn = pytest.mark.skipif(not onednn_dtypes(), reason="this torch build has no oneDNN linear")


@onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_float64(dtype, bias):
    """The prepacked oneDNN matmul equals the float64 product (2-D, 3-D and non-contiguous inputs)."""
    if dtype not in onednn_dtypes():
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(0)
    lin = Linear(48, 40, bias=bias).to(dtype)
    lin.backend = "onednn"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for x in (torch.randn(7, 48), torch.randn(2, 5, 48), torch.randn(48, 5, 3).permute(2, 1, 0)):
        x = x.to(dtype)
        with torch.no_grad():
            got = lin(x)
        assert got.dtype == dtype and lin.packed
        want = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@onednn
def test_onednn_linear_packs_in_place_and_gives_the_weight_back():
    """The packed weight replaces the plain one (the plain Parameter is emptied, not kept); reading
    `.weight`, state_dict, load_state_dict, dtype changes, copies and pickles see the plain weight,
    exactly; an in-place update is packed again; gradients and float64 take torch's path."""
    import copy
    import pickle

    torch.manual_seed(0)
    lin = Linear(16, 8)
    lin.backend = "onednn"
    plain = lin.weight
    original = plain.detach().clone()
    x = torch.randn(3, 16)

    def check(module, x):
        with torch.no_grad():
            got = module(x)
            assert module.packed == (x.dtype in onednn_dtypes())
            torch.testing.assert_close(got, torch.nn.functional.linear(x, module.weight, module.bias))

    with torch.no_grad():
        lin(x)
    assert lin.packed and plain.numel() == 0  # no second copy
    state = lin.state_dict()
    assert lin.packed and not state["weight"].is_mkldnn and torch.equal(state["weight"], original)
    assert lin.weight is plain and not lin.packed and torch.equal(plain, original)  # the same object back
    check(lin, x)
    with torch.no_grad():
        lin.weight.mul_(-2)
    check(lin, x)
    assert torch.equal(lin.weight, -2 * original)
    lin.load_state_dict({"weight": original, "bias": torch.randn(8)})
    check(lin, x)
    assert torch.equal(lin.weight, original)
    check(lin, x)
    for clone in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert not clone.packed and torch.equal(clone.weight, original)
        check(clone, x)
    lin.to(torch.bfloat16)
    check(lin, x.bfloat16())
    lin.float()
    check(lin, x)
    y = lin(x.requires_grad_())  # autograd: torch's path, with the weight's own gradient
    y.sum().backward()
    assert not lin.packed and lin.weight is plain and plain.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 16))
    lin.double()
    with torch.no_grad():
        assert torch.equal(lin(x.double()), torch.nn.functional.linear(x.double(), lin.weight, lin.bias))


@onednn
def test_auto_packs_only_the_large_projections_and_never_a_tied_weight(tiny_tokenizer, monkeypatch):
    """ "auto" (the default) packs the weights of at least ONEDNN_MIN_WEIGHT elements, at the first
    inference forward; a weight another module shares is never packed (the embedding reads it)."""
    from dlmcache.models import layers

    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHT", 6000)  # the tiny model's MLP and head, not attention
    model = BUILDERS["llada"](tiny_tokenizer)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    large = sum(m.weight.numel() >= 6000 for m in linears)
    assert 0 < large < len(linears) and all(m.backend == "auto" for m in linears)
    ids = torch.randint(5, 280, (1, 8))
    with torch.no_grad():
        want = model(ids).logits
    assert model.linear_paths() == {"onednn": large, "torch": len(linears) - large}
    model.set_linear_backend("torch")
    assert model.linear_paths() == {"onednn": 0, "torch": len(linears)}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)

    tied = BUILDERS["llada"](tiny_tokenizer)
    head, embedding = tied.get_output_embeddings(), tied.get_input_embeddings()
    head.weight = embedding.weight  # tied by hand ([vocab, d] both)
    tied.set_linear_backend("onednn")
    with torch.no_grad():
        logits = tied(ids).logits
    assert not head.packed and embedding.weight.numel() > 0 and tied.linear_paths()["onednn"] > 0
    with torch.no_grad():
        torch.testing.assert_close(tied(ids).logits, logits)


def test_without_onednn_auto_takes_torch_and_onednn_is_refused(tiny_tokenizer, monkeypatch):
    """A torch build without oneDNN's linear: the default runs torch's matmul everywhere (the same
    logits, bit for bit), and asking for "onednn" says why it cannot."""
    from dlmcache.models import layers

    model = BUILDERS["llada"](tiny_tokenizer)
    ids = torch.randint(5, 280, (1, 6))
    model.set_linear_backend("torch")
    with torch.no_grad():
        want = model(ids).logits
    monkeypatch.setattr(layers, "onednn_dtypes", lambda: ())
    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHT", 1)  # every projection would be packed if it could
    model.set_linear_backend("auto")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert model.linear_paths()["onednn"] == 0
    with pytest.raises(RuntimeError, match="this torch build has no oneDNN"):
        model.set_linear_backend("onednn")


@onednn
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_a_packed_model_saves_and_loads_its_plain_weights(arch, tiny_tokenizer, tmp_path):
    """save_pretrained of a model whose projections are packed writes the plain weights, exactly, and
    the model keeps decoding packed."""
    model = BUILDERS[arch](tiny_tokenizer)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_linear_backend("onednn")
    ids = torch.randint(5, 280, (1, 6))
    with torch.no_grad():
        logits = model(ids).logits
    assert model.linear_paths()["torch"] == 0
    model.save_pretrained(tmp_path / arch)
    assert model.linear_paths()["torch"] == 0  # saving read copies
    loaded = type(model).from_pretrained(tmp_path / arch)
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    loaded.set_linear_backend("onednn")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


@onednn
@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_onednn_linear_backend_matches_torch(arch, tiny_tokenizer):
    model = BUILDERS[arch](tiny_tokenizer)
    ids = torch.randint(5, 280, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
        model.set_linear_backend("onednn")
        got = model(ids).logits
        assert all(m.packed for m in model.modules() if isinstance(m, Linear))
        model.set_linear_backend("torch")
        assert not any(m.packed for m in model.modules() if isinstance(m, Linear))
        assert torch.equal(model(ids).logits, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="linear backend 'mkl'"):
        model.set_linear_backend("mkl")


@onednn
def test_onednn_linear_backend_decodes_like_torch():
    """On the bundled trained model, both backends decode the same tokens, with and without a cache."""
    from dlmcache import tinytask

    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    pipe.set_progress_bar_config(disable=True)
    prompts = [tinytask.messages(p) for p in tinytask.test_problems(6)]
    for cache in ("none", "freecache"):
        pipe.set_cache(cache)
        pipe.model.set_linear_backend("torch")
        want = pipe(prompts, max_new_tokens=32, block_length=16).sequences
        pipe.model.set_linear_backend("onednn")
        assert torch.equal(pipe(prompts, max_new_tokens=32, block_length=16).sequences, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 128), (1, 7, 64), (2, 33, 768), (1, 4, 5, 24), (3, 2, 63, 16), (1, 500, 100)])
def test_the_fused_rms_norm_gives_the_references_bits(dtype, shape):
    """RMSNorm's one-op path (`F.rms_norm`, float32 and float64 on the CPU) against the releases' form
    written out (`rms_norm_reference`): the same bits, awkward widths included."""
    from dlmcache.models.layers import RMSNorm, rms_norm_reference

    torch.manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=dtype) * 3
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-6))
