"""CompressedCache: a transformers `Cache` (v5 layers API) that evicts and/or quantizes KV.

    cache = CompressedCache(policy=KNorm(), budget=0.25)                  # key-only policies
    cache = CompressedCache(policy=SnapKV(), budget=0.25, model=model)    # policies that read queries
    model.generate(**inputs, cache=cache)      # transformers < 5.24: past_key_values=cache

At prefill every layer stores its full K/V (a `store.KVSegment`) and attends over them; then the layer
is compressed (`compression.Compression`): the policy scores the tokens and only `budget` of them are
kept (compact, so memory really shrinks), and / or a quantizer stores them in packed low-bit form.
Decoding appends to the compressed segment; with `compress_every=N` the layer is re-compressed to its
budget every N tokens. Positions keep counting from the original length (RoPE is applied before
caching), and the attention mask is sized to what is stored.

Policies that read the queries or hidden states, and quantizers, need the model attached (`model=` or
`attach`, see `routing`): attention then runs with a mask built from what each layer stores, or, for
quantized entries, in the store's own form (KIVI's codes are read by fused dequantization, never
dequantized whole). A forward that does not use this cache goes through unchanged, so the model keeps
working normally while attached; `detach()`, leaving a `with` block, or the cache being
garbage-collected puts the model's own implementation back (once no attached cache is left).
Nothing is patched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from . import routing
from .compression import Compression, score_inputs
from .policies.base import BudgetAllocator, EvictionPolicy, QuantizationPolicy
from .store import KVSegment


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


class CompressedLayer(CacheLayerMixin):
    """One layer: its `segment` (the stored entries), the number of positions seen, and what the
    compression in progress needs (pending compression, recent queries, cascade rankings, recall
    state)."""

    is_sliding = False

    def __init__(self, owner: CompressedCache, layer_idx: int):
        super().__init__()
        self.owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self.segment: KVSegment | None = None
        self.seen = 0
        self.pending: bool | str = False  # compress after this layer's attention ("steps": compress_every)
        self.returned_stored = False  # the last update returned what is stored (not the full prefill)
        self.returned: torch.Tensor | None = None  # the keys the last update handed to attention
        self.since_compress = 0
        self.scores: torch.Tensor | None = None  # [B, H, S] ranking of the kept tokens (cascading budgets)
        self.recall_state: dict | None = None  # recall policies: what `recall` needs at each step
        self.recall_keep = 0
        self.prompt_length = 0
        self.attended: torch.Tensor | None = None  # [B, H] prompt tokens attended at the last step
        self.recent_queries: torch.Tensor | None = None  # [B, Hq, <=W, D] for compress_every

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- what transformers asks -------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        return self.segment.read()[0] if self.segment is not None and self.segment.is_dense else None

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ sets it; the segment holds the data
        pass

    @property
    def values(self) -> torch.Tensor | None:
        return self.segment.read()[1] if self.segment is not None and self.segment.is_dense else None

    @values.setter
    def values(self, value) -> None:
        pass

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self.segment is None else self.segment.valid

    @property
    def tags(self) -> torch.Tensor | None:
        return None if self.segment is None else self.segment.tags

    @property
    def origin(self) -> torch.Tensor | None:
        return None if self.segment is None else self.segment.origin

    @property
    def stored(self) -> int:
        return 0 if self.segment is None else self.segment.length

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self._update(key_states, value_states)
        self.returned = keys  # the attention routing checks that it sees these very keys
        routing.ACTIVE.set(self.owner)
        return keys, values

    def _update(self, key_states, value_states):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        b, h, n, _ = key_states.shape
        if self.seen == 0:
            self.returned_stored = False
            self.segment = KVSegment.dense(
                key_states,
                value_states,
                valid=owner.prompt_mask(b, n, key_states.device),
                tags=owner.tags_for(b, h, n, 0, key_states.device),
            )
            self.seen = n
            if owner.needs_model:
                owner.require_attached()
                self.pending = True  # compressed after this layer's attention, with its queries
            else:
                owner.compress(self)
            return key_states, value_states
        every = owner.compress_every
        due = bool(every) and n == 1 and self.since_compress + 1 >= every
        if due and not owner.needs_model:  # key-only policies: compress what is stored, then append
            owner.compress(self)
        arrived = torch.arange(self.seen, self.seen + n, device=key_states.device).expand(b, n)
        tags = owner.tags_for(b, h, n, self.seen, key_states.device)
        self.segment.append(key_states, value_states, origin=arrived, tags=tags)
        self.seen += n
        self.returned_stored = True
        self.since_compress += n
        if n > 1 and owner.compress_segments:
            # a new multi-token segment (an agent's next turn): compress everything stored, after this
            # layer's attention when the policy reads the segment's queries
            if owner.needs_model:
                self.pending = True
            else:
                owner.compress(self)
        elif due and owner.needs_model:
            self.pending = "steps"  # after this step's attention, with the queries of the last steps
        if self.segment.is_dense:
            return self.segment.read()
        return key_states, value_states  # quantized entries: the routed attention reads the store itself

    def recall_selection(self, query: torch.Tensor) -> torch.Tensor | None:
        """[B, H, S] the entries a recall policy lets this step attend to (None: no recall policy)."""
        if self.recall_state is None:
            return None
        chosen = self.owner.compression.policy.recall(self.recall_state, query, self.recall_keep)  # [B, H, P]
        self.attended = chosen.sum(-1)
        selected = torch.ones_like(self.segment.valid)
        selected[..., : self.prompt_length] = chosen
        return selected

    def remember_queries(self, query: torch.Tensor, window: int) -> None:
        """Keep the last `window` queries [B, Hq, W, D] seen by this layer (for compress_every)."""
        q = query if self.recent_queries is None else torch.cat([self.recent_queries, query], 2)
        self.recent_queries = q[:, :, -window:]

    def reset(self) -> None:
        self.segment = self.scores = self.recall_state = self.returned = self.recent_queries = None
        self.seen, self.pending, self.since_compress = 0, False, 0
        self.is_initialized = False

    @property
    def nbytes(self) -> int:
        return self.nbytes_as(None)

    def nbytes_as(self, element_bytes: int | None) -> int:
        """Bytes held, counting full-precision entries at `element_bytes` each (None: their dtype's)."""
        return 0 if self.segment is None else self.segment.nbytes_as(element_bytes)


class CompressedCache(Cache):
    """A transformers cache that keeps `budget` of each layer's prefill tokens, chosen by `policy`,
    and / or stores them with `quantizer`.

    policy: an `EvictionPolicy` (None: keep everything, e.g. quantization only). budget: fraction
    *kept* in (0, 1] or a token count, split over layers by `allocator` (uniform by default).
    quantizer: a `QuantizationPolicy` (KIVI, ...) applied to what is kept. compress_every: re-compress
    during decoding every N tokens (to the same budget of everything seen). model: needed by
    policies that read queries / hidden states, by quantizers, by per-layer budgets and by padded
    batches. capture_queries: keep every layer's prefill queries in `queries` (to compress the same
    prefill with other policies through `load_prefill`). token_ids: the prompt ids [B, L], for
    policies that read them (SentenceKV, FastGen). token_tags: integer labels [B, L] of the next tokens
    to arrive (the prompt's at first), e.g. the screenshot index of each visual token and -1 for text;
    they follow the tokens through eviction and reach policies as `ScoreInputs.tags` (GUI-KV reads
    them). They label the next segment to arrive, which must have exactly their length; set
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
        self.compression = Compression(policy, budget, allocator, quantizer)
        if compress_every is not None and (
            isinstance(compress_every, bool) or not isinstance(compress_every, int) or compress_every < 1
        ):
            raise ValueError(f"compress_every={compress_every!r} must be None or a positive integer")
        for name, value in (("capture_queries", capture_queries), ("compress_segments", compress_segments)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a bool")
        _check_token_matrix("attention_mask", attention_mask, allow_bool=True)
        _check_token_matrix("token_ids", token_ids)
        if "mask_queries" in self.compression.reads:
            raise ValueError(
                f"{type(policy).__name__} reads the still-masked answer positions' queries of a diffusion LM: "
                "use it with a denoising cache (DLMPipeline cache_options), not an autoregressive one"
            )
        super().__init__(layers=[])
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
        self._detach = None
        reads = self.compression.reads
        self.needs_model = (
            capture_queries
            or self.compression.recall
            or quantizer is not None
            or bool(reads & {"queries", "all_queries", "hidden"})
        )
        if compress_every is not None:
            self._check_compress_every()
        if model is not None:
            self.attach(model)

    # the settings, as given
    policy = property(lambda self: self.compression.policy)
    budget = property(lambda self: self.compression.budget)
    allocator = property(lambda self: self.compression.allocator)
    quantizer = property(lambda self: self.compression.quantizer)

    def _check_compress_every(self) -> None:
        c, why = self.compression, None
        reads = c.reads
        if c.policy is None:
            why = "it needs an eviction policy"
        elif c.recall:
            why = f"{type(c.policy).__name__} is a recall policy: it evicts nothing"
        elif reads - {"queries"}:
            missing = sorted(reads - {"queries"})
            why = f"{type(c.policy).__name__} reads {missing}, which decoding steps do not provide"
        elif c.allocator.cascading:
            why = f"{type(c.allocator).__name__} cascades budgets over the prefill's layers only"
        elif c.quantizer is not None:
            why = "the quantizer stores new tokens itself; re-compressing would quantize them twice"
        if why:
            raise ValueError(f"compress_every={self.compress_every} cannot be used here: {why}")

    def require_attached(self) -> None:
        if self._detach is None:
            what = "stores quantized entries" if self.quantizer is not None else "reads the queries / hidden states"
            name = type(self.policy or self.quantizer).__name__
            raise ValueError(
                f"{name} {what}: build the cache with CompressedCache(..., model=model) or call cache.attach(model)"
            )

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

    # -- labels and masks of arriving tokens ---------------------------------------------------------
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
            if not layer.segment.is_dense:
                raise ValueError("drop_tagged works on unquantized layers only")
            layer.segment.keep(layer.segment.valid & ~drop(layer.segment.tags))

    # -- compression --------------------------------------------------------------------------------
    def layer_budget(self, layer: CompressedLayer) -> int:
        num_layers = self.num_layers or max(len(self.layers), layer.layer_idx + 1)
        return self.compression.layer_budget(layer.seen, layer.layer_idx, num_layers)

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
        b, h, n, _ = keys.shape
        mask = key_mask.bool() if key_mask is not None else self.prompt_mask(b, n, keys.device)
        layer.segment = KVSegment.dense(keys, values, valid=mask, tags=self.tags_for(b, h, n, 0, keys.device))
        layer.seen = n
        if hidden is not None:
            self.hidden[layer_idx] = hidden
        self.compress(layer, queries=queries, scale=scale)
        layer.returned_stored = True

    def after_attention(self, layer: CompressedLayer, query: torch.Tensor, scale: float | None) -> None:
        """Called by the routed attention after each layer of a forward on this cache."""
        if self.compress_every and self.needs_model and self.policy is not None:
            layer.remember_queries(query, self.policy.query_window or query.shape[2])
        if layer.pending:
            queries = layer.recent_queries if layer.pending == "steps" else query
            self.compress(layer, queries=queries, scale=scale)

    def compress(self, layer: CompressedLayer, queries: torch.Tensor | None = None, scale: float | None = None) -> None:
        """Evict (and quantize) `layer` down to its budget; `queries`: the prefill's queries."""
        layer.pending, layer.since_compress = False, 0
        c = self.compression
        if self.capture_queries and queries is not None:
            self.queries[layer.layer_idx] = queries
        if not layer.segment.is_dense:  # re-compressing quantized entries (a new turn): back to dense first
            layer.segment.data = _dense(layer.segment)
        if c.policy is not None:
            self._evict(layer, queries, scale)
        if c.quantizer is not None:
            inputs = score_inputs(layer.segment, layer.layer_idx, self.num_layers or 1, queries=queries, scale=scale)
            c.quantize(layer.segment, inputs)
            if c.quantizer.cross_layer:
                self._merge_with_previous(layer)

    def _merge_with_previous(self, layer: CompressedLayer) -> None:
        """MiniCache: from the middle layer up, every second layer shares storage with the one below."""
        half = (self.num_layers or len(self.layers)) // 2
        i = layer.layer_idx
        if i > half and (i - half) % 2 == 1:
            lower = self.layers[i - 1]
            lower.segment.data, layer.segment.data = self.quantizer.merge_pair(lower.segment.data, layer.segment.data)

    def _evict(self, layer: CompressedLayer, queries, scale) -> None:
        c = self.compression
        keep = self.layer_budget(layer)
        inputs = score_inputs(
            layer.segment,
            layer.layer_idx,
            self.num_layers or 1,
            queries=queries,
            hidden=self.hidden.pop(layer.layer_idx, None),
            token_ids=self.token_ids,
            budget=keep,
            scale=scale,
        )
        if c.recall:
            layer.recall_state = c.policy.build(inputs)
            layer.recall_keep, layer.prompt_length = keep, layer.segment.length
            return
        if not bool(layer.segment.valid.all()) and not self.needs_model and self._detach is None:
            raise ValueError("a padded batch needs the model attached: CompressedCache(..., model=model)")
        if c.allocator.cascading:
            # Cascading budgets (CAKE, D2O): share the budget of the layers seen so far by preference
            # and re-trim the earlier ones, which kept their rankings for this.
            c.allocator.observe(inputs)
            done = [other.layer_idx for other in self.layers if other.scores is not None] + [layer.layer_idx]
            budgets = c.allocator.cascade_budgets(c.budget, layer.seen, done)
            for i in done[:-1]:
                other = self.layers[i]
                if budgets[i] < other.segment.length:
                    other.scores = c.evict_ranked(other.segment, other.scores, budgets[i])
            layer.scores = c.evict_ranked(layer.segment, c.policy.ranking(inputs), budgets[layer.layer_idx])
        else:
            c.evict(layer.segment, inputs, keep)

    # -- attaching a model ----------------------------------------------------------------------------
    def attach(self, model) -> CompressedCache:
        """Route the model's attention through this cache's hooks (queries for scoring, per-layer
        masks, quantized attention); returns self, usable as a context manager that detaches on exit.
        Other forwards of the model are unaffected while attached."""
        if self._detach is not None:
            return self
        self.num_layers = model.config.get_text_config().num_hidden_layers
        capture = self.policy is not None and "hidden" in self.policy.needs
        self._detach = routing.attach(self, model, capture_hidden=capture)
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


def _dense(segment: KVSegment):
    from .store import DenseKV

    return DenseKV(*segment.read())


def _check_token_matrix(name: str, value, allow_bool: bool = False) -> None:
    """None or a [B, L] tensor of integers (or bools)."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a [batch, length] tensor, got {type(value).__name__}")
    ok = not value.is_floating_point() and not value.is_complex() and (allow_bool or value.dtype != torch.bool)
    if value.dim() != 2 or not ok:
        raise ValueError(f"{name} must be a [batch, length] integer tensor, got {value.dtype} {tuple(value.shape)}")
