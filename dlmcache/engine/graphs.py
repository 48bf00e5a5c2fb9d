"""Static shapes for the engine's forward: shape buckets, and CUDA graphs captured per bucket.

A step's flattened input (`StepInput`) changes shape every step: T fed tokens, R attention rows, K
keys per row, N queries in the fullest row, M logits. A graph replays fixed shapes, so `Buckets`
rounds each one up to a power of two (from a floor), and `pad_step` pads the step to those sizes:

- the padded tokens are token 0 at position 0, and they write their K/V to the null block (slot 0),
  which is only ever read under a mask;
- they are the queries of scratch attention rows of their own, each with one valid key (the null
  slot), so no real row sees them and no row's softmax is empty;
- the real rows' padded keys are invalid, and the padded logits are dropped (`StepInput.tokens` and
  `target_row` keep the real counts).

A padded step computes for every real token what the unpadded one computes. The CPU tests check
this token for token on the engine's rules: full attention with every cache, and block diffusion. A
forward per bucket can then be captured once as a CUDA graph and replayed: `GraphedForward` copies
each step's padded inputs into the graph's static buffers and replays it. That removes the per-op
launch cost, which is what bounds a small model's step on a GPU. It runs on CUDA only, and needs a
forward with no host reads (no compressed prompts, no mixture of experts: their expert counts are
read on the host).

`BatchedDecoder(..., graphs="buckets")` pads every step and runs it eagerly, on any device;
`graphs="cuda"` pads and replays graphs; "off" (the default) runs each step at its own shape. (The
`cuda` mode's test and `scripts/bench_graphs.py` need a GPU; none has been lent to this project, so
that mode has not run yet.)
"""

from __future__ import annotations

import dataclasses

import torch

from .batch import StepInput

GRAPH_MODES = ("off", "buckets", "cuda")


def round_up(n: int, floor: int) -> int:
    """The bucket of size n: the smallest power of two >= max(n, floor)."""
    return 1 << (max(n, floor, 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Floors of the padded sizes (each rounds up to a power of two from its floor): fed tokens,
    attention rows, keys per row, queries per row, logits. Larger floors mean fewer distinct shapes
    (fewer graphs to capture) and more padding."""

    tokens: int = 16
    rows: int = 1
    keys: int = 64
    queries: int = 16
    logits: int = 16

    def __post_init__(self):
        for name in ("tokens", "rows", "keys", "queries", "logits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Buckets({name}={value!r}): expected a positive int")

    def sizes(self, step: StepInput) -> tuple[int, int, int, int, int]:
        """(T, R, K, N, M) of `step` padded: scratch rows hold the padded tokens, N to a row."""
        t, (r, k), n, m = step.tokens, step.key_slots.shape, step.max_queries, step.logit_index.numel()
        n_b = round_up(n, self.queries)
        t_b = round_up(t, self.tokens)
        rows = round_up(r + scratch_rows(t, t_b, n_b), self.rows)
        return t_b, rows, round_up(k, self.keys), n_b, round_up(m, self.logits)


def scratch_rows(tokens: int, padded: int, queries: int) -> int:
    """The scratch attention rows that hold `padded - tokens` padded queries, `queries` to a row."""
    return -(-(padded - tokens) // queries)


def pad_step(step: StepInput, sizes: tuple[int, int, int, int, int]) -> StepInput:
    """`step` padded to sizes (T, R, K, N, M) (see the module docstring). Not for a step with
    compressed prompts (`step.prompts`), whose segment attention lays out the real rows only."""
    if step.prompts is not None:
        raise ValueError("a step with compressed prompts is not padded (its segments are read per real row)")
    t_b, r_b, k_b, n_b, m_b = sizes
    t, (r, k), m = step.tokens, step.key_slots.shape, step.logit_index.numel()
    if t_b < t or k_b < k or n_b < step.max_queries or m_b < m or r_b < r + scratch_rows(t, t_b, n_b):
        n = step.max_queries
        raise ValueError(f"sizes {sizes} are smaller than the step's (T={t}, R={r}, K={k}, N={n}, M={m})")
    device, pad = step.input_ids.device, t_b - t
    extra, zeros = torch.arange(pad, device=device), torch.zeros(pad, device=device)

    def grow(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, values.to(x.dtype)])

    key_slots = step.key_slots.new_zeros(r_b, k_b)
    key_slots[:r, :k] = step.key_slots
    key_valid = step.key_valid.new_zeros(r_b, k_b)
    key_valid[:r, :k] = step.key_valid
    key_valid[r:, 0] = True  # the scratch rows' one key: the null slot
    return dataclasses.replace(
        step,
        input_ids=grow(step.input_ids, zeros),
        positions=grow(step.positions, zeros),
        slots=grow(step.slots, zeros),
        query_row=grow(step.query_row, r + torch.div(extra, n_b, rounding_mode="floor")),
        query_rank=grow(step.query_rank, extra % n_b),
        max_queries=n_b,
        key_slots=key_slots,
        key_valid=key_valid,
        every_key=False,
        fresh_keys=False,
        write_kv=True,
        logit_index=grow(step.logit_index, torch.zeros(m_b - m, device=device)),
    )


class GraphedForward:
    """The engine's forward (hidden states, LM head at the logit rows, the last layer's fresh values)
    as one CUDA graph per bucket of padded shapes: captured at a bucket's first step, replayed after
    (see the module docstring). `forward(step)` is the eager forward it captures: (logits, values)."""

    def __init__(self, model, forward):
        if not torch.cuda.is_available() or model.device.type != "cuda":
            raise ValueError(f"graphs='cuda' needs the model on a CUDA device (it is on {model.device})")
        self.forward = forward
        self.graphs: dict[tuple, tuple] = {}  # sizes -> (graph, static step, logits, values)

    def __call__(self, step: StepInput, sizes: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [M_b, V] and values [T_b, Hkv, D] of the padded `step` (its shapes are `sizes`)."""
        key = (*sizes, step.key_slots.shape[0] * step.max_queries == step.tokens)
        entry = self.graphs.get(key)
        if entry is None:
            static = dataclasses.replace(step, **{f: getattr(step, f).clone() for f in _TENSORS})
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture (allocator, Triton autotuning)
                for _ in range(2):
                    self.forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits, values = self.forward(static)
            entry = self.graphs[key] = (graph, static, logits, values)
        graph, static, logits, values = entry
        for f in _TENSORS:
            getattr(static, f).copy_(getattr(step, f))
        graph.replay()
        return logits, values


#: The `StepInput` fields a captured graph reads from its static buffers.
_TENSORS = ("input_ids", "positions", "slots", "query_row", "query_rank", "key_slots", "key_valid", "logit_index")
