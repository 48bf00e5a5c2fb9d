"""CompressedCache: a transformers `Cache` (v5 layers API) that evicts and/or quantizes KV.

    cache = CompressedCache(policy=KNorm(), budget=0.25)                  # key-only policies
    cache = CompressedCache(policy=SnapKV(), budget=0.25, model=model)    # policies that read queries
    model.generate(**inputs, cache=cache)      # transformers < 5.24: past_key_values=cache

At prefill every layer stores its full K/V and attends over them; then the layer is compressed: the
policy scores the tokens and only `budget` of them are kept (compact, so memory really shrinks), and /
or a quantizer stores them in packed low-bit form. Decoding appends to the compressed cache; with
`compress_every=N` the layer is re-compressed to its budget every N tokens. Positions keep counting
from the original length (RoPE is applied before caching), and the attention mask is sized to what is
stored.

Policies that read the queries or hidden states need the model attached (`model=` or `attach`): the
cache then switches the model to an attention implementation ("dlmcache_sdpa" / "dlmcache_eager") that
runs the model's own attention, hands the queries to the cache after the prefill, and builds each
layer's mask from what that layer stores (so layers may keep different numbers of tokens). A forward
that does not use this cache goes through that implementation unchanged, so the model keeps working
normally while attached; `detach()`, leaving a `with` block, or the cache being garbage-collected
puts the model's own implementation back (once no attached cache is left). Nothing is patched.
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from collections.abc import Callable

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from .policies.base import BudgetAllocator, EvictionPolicy, QuantizationPolicy, ScoreInputs
from .policies.budget import Uniform


def _takes_cache_argument() -> bool:
    from packaging.version import Version
    from transformers import __version__

    return Version(__version__).release >= (5, 24)


#: The keyword transformers' models and `generate` take a cache by: "cache" from transformers 5.24
#: (which deprecates the old name), "past_key_values" before.
CACHE_ARGUMENT = "cache" if _takes_cache_argument() else "past_key_values"


def cache_argument(cache) -> dict:
    """`{CACHE_ARGUMENT: cache}`, to pass a cache to a transformers model or `generate` under either name."""
    return {CACHE_ARGUMENT: cache}


_ACTIVE: contextvars.ContextVar[CompressedCache | None] = contextvars.ContextVar("dlmcache_active_cache", default=None)
# model -> [its own attention implementation, number of caches attached to it]
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CompressedLayer(CacheLayerMixin):
    """One layer's storage: kept keys/values [B, H, S, D] (or a quantized store), the number of
    positions seen, and which stored entries are real tokens."""

    is_sliding = False

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__()
        self.owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self.seen = 0
        self.valid: torch.Tensor | None = None  # [B, H, S] stored entry is a real token (per KV head)
        self.pending = False  # prefill stored in full, waiting for the queries
        self.returned_stored = False  # the last update returned what is stored (not the full prefill)
        self.since_compress = 0
        self.store = None  # a QuantizedStore when a quantizer is set
        self.scores: torch.Tensor | None = None  # [B, H, S] ranking of the kept tokens (cascading budgets)
        self.tags: torch.Tensor | None = None  # [B, H, S] the caller's labels of the stored entries
        self.origin: torch.Tensor | None = None  # [B, H, S] arrival index (0 = first token seen) of each entry
        self.recall_state: dict | None = None  # recall policies: what `recall` needs at each step
        self.recall_keep = 0
        self.prompt_length = 0
        self.attended: torch.Tensor | None = None  # [B, H] prompt tokens attended at the last step
        self.returned: torch.Tensor | None = None  # the keys the last update handed to attention
        self.recent_queries: torch.Tensor | None = None  # [B, Hq, <=W, D] for compress_every

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- what transformers asks -------------------------------------------------------------------
    @property
    def stored(self) -> int:
        if self.store is not None:
            return self.store.length
        return 0 if self.keys is None else self.keys.shape[2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self._update(key_states, value_states)
        self.returned = keys  # the attention routing checks that it sees these very keys
        _ACTIVE.set(self.owner)
        return keys, values

    def _update(self, key_states, value_states):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, n, _ = key_states.shape
        new_valid = torch.ones(b, h, n, dtype=torch.bool, device=key_states.device)
        if self.seen == 0:
            self.returned_stored = False
            self.keys, self.values = key_states, value_states
            self.valid = self.owner.prompt_mask(b, n, key_states.device)[:, None].expand(-1, h, -1)
            self.tags = self.owner.tags_for(b, h, n, 0, key_states.device)
            self.origin = torch.arange(n, device=key_states.device).expand(b, h, n)
            self.seen = n
            if self.owner.needs_model:
                if self.owner._detach is None:
                    raise ValueError(
                        f"{type(self.owner.policy).__name__} reads the queries / hidden states: build the cache with "
                        "CompressedCache(..., model=model) or call cache.attach(model)"
                    )
                self.pending = True  # compressed after this layer's attention, with its queries
            else:
                self.owner.compress(self)
            return key_states, value_states
        every = self.owner.compress_every
        due = bool(every) and n == 1 and self.since_compress + 1 >= every
        if due and not self.owner.needs_model:  # key-only policies: compress what is stored, then append
            self.owner.compress(self)
        arrived = torch.arange(self.seen, self.seen + n, device=key_states.device).expand(b, h, n)
        self.origin = torch.cat([self.origin, arrived], 2)
        tags = self.owner.tags_for(b, h, n, self.seen, key_states.device)
        self.seen += n
        self.returned_stored = True
        self.valid = torch.cat([self.valid, new_valid], 2)
        self.tags = torch.cat([self.tags, tags], 2)
        if self.store is not None:
            self.store.append(key_states, value_states)
            keys, values = self.store.read()
        else:
            self.keys = torch.cat([self.keys, key_states], 2)
            self.values = torch.cat([self.values, value_states], 2)
            keys, values = self.keys, self.values
        self.since_compress += n
        if n > 1 and self.owner.compress_segments:
            # a new multi-token segment (an agent's next turn): compress everything stored, after this
            # layer's attention when the policy reads the segment's queries
            if self.owner.needs_model:
                self.pending = True
            else:
                self.owner.compress(self)
                keys, values = self.store.read() if self.store is not None else (self.keys, self.values)
        elif due and self.owner.needs_model:
            self.pending = "steps"  # after this step's attention, with the queries of the last steps
        return keys, values

    def remember_queries(self, query: torch.Tensor, window: int) -> None:
        """Keep the last `window` queries [B, Hq, W, D] seen by this layer (for compress_every)."""
        q = query if self.recent_queries is None else torch.cat([self.recent_queries, query], 2)
        self.recent_queries = q[:, :, -window:]

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.tags = self.origin = None
        self.store = self.scores = self.recall_state = self.returned = self.recent_queries = None
        self.seen, self.pending, self.since_compress = 0, False, 0
        self.is_initialized = False

    @property
    def nbytes(self) -> int:
        return self.nbytes_as(None)

    def nbytes_as(self, element_bytes: int | None) -> int:
        """Bytes held, counting full-precision entries at `element_bytes` each (None: their dtype's)."""
        if self.store is not None:
            return self.store.nbytes_as(element_bytes)
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * (element_bytes or self.keys.element_size())


class CompressedCache(Cache):
    """A transformers cache that keeps `budget` of each layer's prefill tokens, chosen by `policy`,
    and / or stores them with `quantizer`.

    policy: an `EvictionPolicy` (None: keep everything, e.g. quantization only). budget: fraction
    *kept* in (0, 1] or a token count, split over layers by `allocator` (uniform by default).
    quantizer: a `QuantizationPolicy` (KIVI, ...) applied to what is kept. compress_every: re-compress
    during decoding every N tokens (to the same budget of everything seen). model: needed by
    policies that read queries / hidden states, by per-layer budgets and by padded batches.
    capture_queries: keep every layer's prefill queries in `queries` (to compress the same prefill
    with other policies through `load_prefill`). token_ids: the prompt ids [B, L], for policies that
    read them (SentenceKV, FastGen). token_tags: integer labels [B, L] of the next tokens to arrive
    (the prompt's at first), e.g. the screenshot index of each visual token and -1 for text; they
    follow the tokens through eviction and reach policies as `ScoreInputs.tags` (GUI-KV reads them).
    They label the next segment to arrive, which must have exactly their length; set
    `cache.token_tags` again for a later segment. compress_segments: also compress (everything stored,
    to the budget of everything seen) after each later multi-token segment, not only after the first
    prefill: a multi-turn session's new turns.

    compress_every works with policies that read the keys only or the last queries (kept from the
    last decoding steps); policies that read every query, hidden states or token ids, recall
    policies, cascading budgets and quantizers are refused with it at construction.
    """

    def __init__(
        self,
        policy: EvictionPolicy | None = None,
        budget: float | int = 1.0,
        allocator: BudgetAllocator | None = None,
        quantizer: QuantizationPolicy | None = None,
        compress_every: int | None = None,
        model=None,
        attention_mask: torch.Tensor | None = None,
        capture_queries: bool = False,
        token_ids: torch.Tensor | None = None,
        token_tags: torch.Tensor | None = None,
        compress_segments: bool = False,
    ):
        for name, value, cls in (
            ("policy", policy, EvictionPolicy),
            ("allocator", allocator, BudgetAllocator),
            ("quantizer", quantizer, QuantizationPolicy),
        ):
            if value is not None and not isinstance(value, cls):
                article = "an" if cls.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{name} must be {article} {cls.__name__}, got {type(value).__name__}: {value!r}")
        if compress_every is not None and (
            isinstance(compress_every, bool) or not isinstance(compress_every, int) or compress_every < 1
        ):
            raise ValueError(f"compress_every={compress_every!r} must be None or a positive integer")
        for name, value in (("capture_queries", capture_queries), ("compress_segments", compress_segments)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a bool")
        _check_token_matrix("attention_mask", attention_mask, allow_bool=True)
        _check_token_matrix("token_ids", token_ids)
        super().__init__(layers=[])
        self.policy, self.budget, self.quantizer = policy, budget, quantizer
        self.allocator = allocator or Uniform()
        self.compress_every = compress_every
        self.attention_mask = attention_mask
        self.token_ids = token_ids
        self._token_tags: tuple[int, torch.Tensor] | None = None  # (position of the segment, tags)
        self.token_tags = token_tags
        self.compress_segments = compress_segments
        self.num_layers: int | None = None
        self.hidden: dict[int, torch.Tensor] = {}
        self.capture_queries = capture_queries
        self.queries: dict[int, torch.Tensor] = {}  # prefill queries per layer, when capture_queries
        self._detach: Callable[[], None] | None = None
        self.allocator.validate(budget)
        reads = (policy.needs if policy else frozenset()) | (quantizer.needs if quantizer else frozenset())
        recall = policy is not None and policy.is_recall  # recall policies select inside attention
        self.needs_model = capture_queries or recall or bool(reads & {"queries", "all_queries", "hidden"})
        if compress_every is not None:
            self._check_compress_every(recall, reads)
        if model is not None:
            self.attach(model)

    def _check_compress_every(self, recall: bool, reads: frozenset) -> None:
        why = None
        if self.policy is None:
            why = "it needs an eviction policy"
        elif recall:
            why = f"{type(self.policy).__name__} is a recall policy: it evicts nothing"
        elif reads - {"queries"}:
            missing = sorted(reads - {"queries"})
            why = f"{type(self.policy).__name__} reads {missing}, which decoding steps do not provide"
        elif self.allocator.cascading:
            why = f"{type(self.allocator).__name__} cascades budgets over the prefill's layers only"
        elif self.quantizer is not None:
            why = "the quantizer stores new tokens itself; re-compressing would quantize them twice"
        if why:
            raise ValueError(f"compress_every={self.compress_every} cannot be used here: {why}")

    @property
    def token_tags(self) -> torch.Tensor | None:
        return None if self._token_tags is None else self._token_tags[1]

    @token_tags.setter
    def token_tags(self, tags: torch.Tensor | None) -> None:
        """Label the next segment to arrive ([B, n] integers, n its length; None: no labels)."""
        _check_token_matrix("token_tags", tags)
        self._token_tags = None if tags is None else (self.get_seq_length(), tags)

    # -- transformers Cache interface ---------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's K/V (codes, scales and residual included for quantized layers)."""
        return sum(layer.nbytes for layer in self.layers)

    def nbytes_as(self, element_bytes: int) -> int:
        """`nbytes` with full-precision entries counted at `element_bytes` (2: as a 16-bit cache would)."""
        return sum(layer.nbytes_as(element_bytes) for layer in self.layers)

    def stored_tokens(self) -> list[int]:
        return [layer.stored for layer in self.layers]

    # -- compression --------------------------------------------------------------------------------
    def prompt_mask(self, batch: int, length: int, device) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        if tuple(self.attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask has shape {tuple(self.attention_mask.shape)} but the prefill is [{batch}, {length}]"
            )
        return self.attention_mask.to(device=device, dtype=torch.bool)

    def tags_for(self, batch: int, heads: int, length: int, start: int, device) -> torch.Tensor:
        """[B, H, n] labels of `length` tokens arriving at position `start`: `token_tags` for the
        segment they were set for, else -1 (e.g. decoded tokens)."""
        if self._token_tags is None or self._token_tags[0] != start:
            return torch.full((batch, heads, length), -1, dtype=torch.long, device=device)
        tags = self._token_tags[1]
        if tuple(tags.shape) != (batch, length):
            raise ValueError(f"token_tags has shape {tuple(tags.shape)} but the segment is [{batch}, {length}]")
        return tags.to(device=device, dtype=torch.long)[:, None].expand(-1, heads, -1)

    def drop_tagged(self, drop: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Remove the stored entries whose tags satisfy `drop(tags) -> bool mask` (e.g. screenshots
        that fell out of an agent's history), in every layer; memory shrinks accordingly."""
        for layer in self.layers:
            if layer.keys is None:
                raise ValueError("drop_tagged works on unquantized layers only")
            keep = layer.valid & ~drop(layer.tags)
            count = int(keep.sum(-1).max())
            length = keep.shape[-1]
            order = keep.float() * (2 * length) - torch.arange(length, device=keep.device)  # kept first, in order
            index = order.topk(count, dim=-1).indices.sort(-1).values
            self._gather(layer, layer.keys, layer.values, index, keep.gather(2, index))

    def layer_budget(self, layer: CompressedLayer) -> int:
        num_layers = self.num_layers or max(len(self.layers), layer.layer_idx + 1)
        return self.allocator.layer_budget(self.budget, layer.seen, layer.layer_idx, num_layers)

    def load_prefill(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries=None,
        hidden=None,
        key_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> None:
        """Fill layer `layer_idx` as a prefill of keys / values [B, H, L, D] would, then compress it;
        `queries` [B, Hq, L, D] (and `hidden` [B, L, d]) for policies that read them. Lets one prefill
        be compressed by many policies, or a frozen prompt (DLM, VLM) be compressed after the fact."""
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self, len(self.layers)))
        layer = self.layers[layer_idx]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values, layer.seen = keys, values, keys.shape[2]
        layer.tags = self.tags_for(keys.shape[0], keys.shape[1], keys.shape[2], 0, keys.device)
        layer.origin = torch.arange(keys.shape[2], device=keys.device).expand(keys.shape[0], keys.shape[1], -1)
        mask = key_mask.bool() if key_mask is not None else self.prompt_mask(keys.shape[0], keys.shape[2], keys.device)
        layer.valid = mask if mask.dim() == 3 else mask[:, None].expand(-1, keys.shape[1], -1)
        if hidden is not None:
            self.hidden[layer_idx] = hidden
        self.compress(layer, queries=queries, scale=scale)
        layer.returned_stored = True

    def compress(self, layer: CompressedLayer, queries: torch.Tensor | None = None, scale: float | None = None) -> None:
        """Evict (and quantize) `layer` down to its budget; `queries`: the prefill's queries."""
        layer.pending, layer.since_compress = False, 0
        if self.capture_queries and queries is not None:
            self.queries[layer.layer_idx] = queries
        if self.policy is not None:
            self._evict(layer, queries, scale)
        if self.quantizer is not None:
            keys, values = layer.store.read() if layer.store is not None else (layer.keys, layer.values)
            inputs = ScoreInputs(
                keys=keys,
                values=values,
                layer_idx=layer.layer_idx,
                queries=queries,
                key_mask=layer.valid,
                scale=scale,
                num_layers=self.num_layers or 1,
            )
            layer.store = self.quantizer.store(keys, values, inputs)
            layer.keys = layer.values = None
            if self.quantizer.cross_layer:
                self._merge_with_previous(layer)

    def _merge_with_previous(self, layer: CompressedLayer) -> None:
        """MiniCache: from the middle layer up, every second layer shares storage with the one below."""
        half = (self.num_layers or len(self.layers)) // 2
        i = layer.layer_idx
        if i > half and (i - half) % 2 == 1:
            lower = self.layers[i - 1]
            lower.store, layer.store = self.quantizer.merge_pair(lower.store, layer.store)

    def _evict(self, layer: CompressedLayer, queries, scale) -> None:
        keys, values = layer.store.read() if layer.store is not None else (layer.keys, layer.values)
        inputs = ScoreInputs(
            keys=keys,
            values=values,
            layer_idx=layer.layer_idx,
            num_layers=self.num_layers or 1,
            queries=queries,
            hidden=self.hidden.pop(layer.layer_idx, None),
            key_mask=layer.valid,
            token_ids=self.token_ids,
            tags=layer.tags,
            budget=self.layer_budget(layer),
            scale=scale,
        )
        if self.policy.is_recall:
            layer.recall_state = self.policy.build(inputs)
            layer.recall_keep, layer.prompt_length = self.layer_budget(layer), keys.shape[2]
            return
        if not bool(layer.valid.all()) and not self.needs_model and self._detach is None:
            raise ValueError("a padded batch needs the model attached: CompressedCache(..., model=model)")
        keep = self.layer_budget(layer)
        if self.allocator.cascading:
            # Cascading budgets (CAKE): share the budget of the layers seen so far by preference and
            # re-trim the earlier ones, which kept their token scores for this.
            self.allocator.observe(inputs)
            done = [other.layer_idx for other in self.layers if other.scores is not None] + [layer.layer_idx]
            budgets = self.allocator.cascade_budgets(self.budget, layer.seen, done)
            for i in done[:-1]:
                self._keep_best(self.layers[i], budgets[i])
            ranking = self.policy.ranking(inputs)
            index = ranking.topk(min(budgets[layer.layer_idx], inputs.length), dim=-1).indices.sort(-1).values
            layer.scores = ranking.gather(2, index)
            self._gather(layer, keys, values, index, torch.ones_like(index, dtype=torch.bool))
        elif keep < keys.shape[2]:
            index, kept = self.policy.select_ragged(inputs, keep)  # [B, H, K]: per-head selections
            merged = self.policy.merge(inputs, index)
            if merged is None:
                self._gather(layer, keys, values, index, kept)
            else:
                self._store(layer, merged[0], merged[1], index, kept)

    @classmethod
    def _gather(cls, layer: CompressedLayer, keys, values, index, kept) -> None:
        from .ops import gather_kv

        cls._store(layer, *gather_kv(keys, values, index), index, kept)

    @staticmethod
    def _store(layer: CompressedLayer, keys, values, index, kept) -> None:
        """Store `keys`/`values` [B, H, K, D] as the layer's entries, taken from positions `index`
        [B, H, K] of what it held: each entry's validity, tag and arrival index follow it."""
        layer.valid = layer.valid.gather(2, index) & kept
        layer.tags = layer.tags.gather(2, index)
        layer.origin = layer.origin.gather(2, index)
        layer.keys, layer.values = keys.contiguous(), values.contiguous()
        layer.store = None

    def _keep_best(self, layer: CompressedLayer, keep: int) -> None:
        """Re-trim an already compressed layer to its `keep` best stored tokens (cascading budgets)."""
        if keep >= layer.scores.shape[2]:
            return
        index = layer.scores.topk(keep, dim=-1).indices.sort(-1).values
        layer.scores = layer.scores.gather(2, index)
        self._gather(layer, layer.keys, layer.values, index, torch.ones_like(index, dtype=torch.bool))

    # -- attaching a model ----------------------------------------------------------------------------
    def attach(self, model) -> CompressedCache:
        """Route the model's attention through this cache's hooks (queries for scoring, per-layer
        masks); returns self, usable as a context manager that detaches on exit. Other forwards of the
        model are unaffected while attached."""
        if self._detach is not None:
            return self
        name = _register_attention(_own_implementation(model))
        self.num_layers = model.config.get_text_config().num_hidden_layers
        handles = []
        if self.policy is not None and "hidden" in self.policy.needs:
            owner = weakref.ref(self)
            for module in model.modules():
                if hasattr(module, "layer_idx") and hasattr(module, "q_proj"):
                    handles.append(module.register_forward_pre_hook(_capture_hidden(owner), with_kwargs=True))
        entry = _ATTACHED.setdefault(model, [_own_implementation(model), 0])
        entry[1] += 1
        model.set_attn_implementation(name)
        # Detach when asked, or when this cache is collected; the finalizer holds no reference to self.
        self._detach = weakref.finalize(self, _release, weakref.ref(model), handles)
        return self

    def detach(self) -> None:
        """Stop routing the model's attention through this cache (the model's own implementation comes
        back once no attached cache is left)."""
        if self._detach is not None:
            self._detach()
            self._detach = None

    def __enter__(self) -> CompressedCache:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _own_implementation(model) -> str:
    if model in _ATTACHED:
        return _ATTACHED[model][0]
    base = model.config._attn_implementation or "sdpa"
    return base[len("dlmcache_") :] if base.startswith("dlmcache_") else base


def _release(model_ref, handles) -> None:
    for h in handles:
        h.remove()
    model = model_ref()
    if model is None or model not in _ATTACHED:
        return
    entry = _ATTACHED[model]
    entry[1] -= 1
    if entry[1] == 0:
        del _ATTACHED[model]
        model.set_attn_implementation(entry[0])


def _check_token_matrix(name: str, value, allow_bool: bool = False) -> None:
    """None or a [B, L] tensor of integers (or bools)."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a [batch, length] tensor, got {type(value).__name__}")
    ok = not value.is_floating_point() and not value.is_complex() and (allow_bool or value.dtype != torch.bool)
    if value.dim() != 2 or not ok:
        raise ValueError(f"{name} must be a [batch, length] integer tensor, got {value.dtype} {tuple(value.shape)}")


def _capture_hidden(owner_ref):
    def hook(module, args, kwargs):
        cache = owner_ref()
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is not None and hidden is not None and hidden.shape[1] > 1:
            cache.hidden[module.layer_idx] = hidden.detach()

    return hook


def _layer_mask(layer: CompressedLayer, q_len: int, query_heads: int) -> torch.Tensor:
    """[B, Hq, q, S] for a compressed layer: stored entries by their per-head validity, the q new
    tokens causally; each KV head's mask is shared by its query heads."""
    valid = layer.valid  # [B, H, S], the q new tokens already appended
    stored = valid.shape[2]
    causal = torch.ones(q_len, stored, dtype=torch.bool, device=valid.device).tril(stored - q_len)
    mask = valid[:, :, None, :] & causal
    return mask.repeat_interleave(query_heads // valid.shape[1], dim=1)


def _recall_mask(policy, layer: CompressedLayer, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Restrict the prompt part of `mask` [B, Hq, q, S] to what the recall policy selects this step."""
    chosen = policy.recall(layer.recall_state, query, layer.recall_keep)  # [B, H, P]
    layer.attended = chosen.sum(-1)
    groups = query.shape[1] // chosen.shape[1]
    prompt = chosen.repeat_interleave(groups, dim=1)[:, :, None, :]
    mask = mask.clone()
    mask[..., : layer.prompt_length] &= prompt
    return mask


def _register_attention(base: str) -> str:
    """Register "dlmcache_<base>" (attention + mask interfaces) once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in ("sdpa", "eager"):
        raise ValueError(f"CompressedCache supports models running 'sdpa' or 'eager' attention, not {base!r}")
    name = f"dlmcache_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        cache = _ACTIVE.get()
        _ACTIVE.set(None)
        layer = None
        layer_idx = getattr(module, "layer_idx", None)  # None: e.g. a VLM's vision tower
        if cache is not None and layer_idx is not None and layer_idx < len(cache.layers):
            layer = cache.layers[layer_idx]
            if layer.returned is not key:  # this forward does not run on our cache
                layer = None
        if layer is not None and layer.returned_stored:
            attention_mask = _layer_mask(layer, query.shape[2], query.shape[1])
            if layer.recall_state is not None:
                attention_mask = _recall_mask(cache.policy, layer, query, attention_mask)
            if base == "eager":
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min
                )
        if base == "sdpa":
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            fn = sys.modules[type(module).__module__].eager_attention_forward
        out = fn(module, query, key, value, attention_mask, **kwargs)
        if layer is not None and cache.compress_every and cache.needs_model:
            layer.remember_queries(query.detach(), cache.policy.query_window or query.shape[2])
        if layer is not None and layer.pending:
            queries = layer.recent_queries if layer.pending == "steps" else query.detach()
            cache.compress(layer, queries=queries, scale=kwargs.get("scaling"))
        return out

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
