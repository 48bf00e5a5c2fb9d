"""FreeCache (Hu et al., "FlashDLM", arXiv 2505.21467): freeze what is finished, recompute the rest."""

from __future__ import annotations

import numpy as np
import torch

from .reuse import KVReuseCache

#: FreeCache's default drift threshold (a cosine distance); see `FreeCache`.
DEFAULT_DRIFT = 0.02
_UNSET = object()


class FreeCache(KVReuseCache):
    """`cache="freecache"`: the prompt's KV is computed once and frozen; a position's KV is frozen once it
    is final; each step feeds only what is not final in the active window: by default the active
    block's still-masked positions, and each token committed since it was last fed, once. It is two
    rules: a freeze rule, which says what a cached step feeds, and a refresh rule, which says when a
    step recomputes instead.

    Freeze rule:
      freeze: "token" (default): only the positions whose KV is not final yet: the still-masked ones
        in the window, and each token committed since it was last fed, once. "block" (the published
        rule of FlashDLM, arXiv 2505.21467, with its window through the canvas's end: `freeze="block",
        suffix_window=None`): the active block is fed whole until it is finished, and once more on the
        first step of the next block (its last step committed tokens whose KV was computed while they
        were masked).
      suffix_window: later (masked) positions recomputed with the block each step (default 0: none;
        None: all of them).
      beyond_window: what the model sees of positions after the window: "cache" (their last computed
        KV, as DualCache reuses the suffix) or "drop" (not attended, as the FlashDLM code does).
    The default (token freezing, no suffix window) is the fastest of the rules that stay within one
    point of no cache on the bundled tiny task and on the long-prompt task (docs/results.md, "The
    default FreeCache rule"): 98.6% against 99.2% and 81.7% against 79.3%, at 3.3x and 10.8x the
    answer tokens/s of no cache.

    Refresh rule:
      refresh_drift (default 0.02): a row recomputes its canvas when the
        frozen KV it reads has drifted by more than this cosine distance, measured each cached step on
        `probe_tokens` (default 4) frozen positions next to the window; None: never.
      refresh_every: also recompute every row every k steps (k = 1: the no-cache reference, bit for
        bit).
    The drift rule is the default because freezing the prompt's KV from the first step (computed while
    the whole answer was masked) costs accuracy on the bundled model that the drift refreshes win back
    at a few extra forwards (measured in docs/results.md).

    flashdlm=True: FlashDLM's FreeCache exactly (block freezing without the delayed step, every later
    position fed, never refreshed); it cannot be combined with the options above.

    Refresh scope (`refresh_prompt`) and prompt compression (`policy`, `budget`, `allocator`,
    `quantizer`): see `KVReuseCache`. Without compression a refresh recomputes the prompt too by
    default while the prompt is no longer than the answer, and the canvas alone when it is longer
    (`refreshes_prompt`: on long prompts the canvas alone is as accurate and a refresh no longer
    costs a forward over the whole prompt; on the short bundled task recomputing the prompt is worth
    1.4-1.8 points: docs/results.md); with `refresh_every` given, always the prompt too, so that
    `refresh_every=1` stays the no-cache reference. `refresh_prompt=True` / `False` fixes the scope
    for every row.
    Every row decides on its own (probes, drift, refresh scope, refreshes in forwards of their own
    rows), so a batch decodes exactly like its rows one by one.
    """

    name = "freecache"

    def __init__(
        self,
        suffix_window: int | None | object = _UNSET,
        beyond_window: str = "cache",
        refresh_every: int | None = None,
        freeze: str | object = _UNSET,
        refresh_drift=_UNSET,
        probe_tokens: int = 4,
        flashdlm: bool = False,
        **compression,
    ):
        self._periodic = refresh_every is not None  # a periodic refresh is a recompute (k = 1: `none`)
        super().__init__(**compression)
        if not isinstance(flashdlm, bool):
            raise TypeError(f"flashdlm={flashdlm!r} must be a bool")
        if flashdlm:
            given = {
                "suffix_window": suffix_window is not _UNSET, "beyond_window": beyond_window != "cache",
                "refresh_every": refresh_every is not None, "freeze": freeze is not _UNSET,
                "refresh_drift": refresh_drift is not _UNSET,
            }  # fmt: skip
            if any(given.values()):
                raise ValueError(
                    f"flashdlm=True is FlashDLM's exact algorithm: drop {[k for k, v in given.items() if v]}"
                )
            freeze, suffix_window, refresh_drift = "block", None, None
        freeze = "token" if freeze is _UNSET else freeze
        suffix_window = 0 if suffix_window is _UNSET else suffix_window
        if suffix_window is not None and (
            not isinstance(suffix_window, int) or isinstance(suffix_window, bool) or suffix_window < 0
        ):
            raise ValueError(f"suffix_window={suffix_window!r} must be None (all) or an integer >= 0")
        if beyond_window not in ("cache", "drop"):
            raise ValueError(f"beyond_window={beyond_window!r}: expected 'cache' or 'drop'")
        if refresh_every is not None and (
            not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1
        ):
            raise ValueError(f"refresh_every={refresh_every!r} must be None or an integer >= 1")
        if freeze not in ("block", "token"):
            raise ValueError(f"freeze={freeze!r}: expected 'block' or 'token'")
        refresh_drift = DEFAULT_DRIFT if refresh_drift is _UNSET else refresh_drift
        if refresh_drift is not None and (
            isinstance(refresh_drift, bool) or not isinstance(refresh_drift, (int, float)) or not 0 < refresh_drift < 2
        ):
            raise ValueError(f"refresh_drift={refresh_drift!r} must be None or a cosine distance in (0, 2)")
        if not isinstance(probe_tokens, int) or isinstance(probe_tokens, bool) or probe_tokens < 1:
            raise ValueError(f"probe_tokens={probe_tokens!r} must be a positive integer")
        self.suffix_window, self.beyond_window, self.freeze = suffix_window, beyond_window, freeze
        self.refresh_every, self.refresh_drift, self.probe_tokens = refresh_every, refresh_drift, probe_tokens
        self.flashdlm = flashdlm

    def __repr__(self) -> str:
        if self.flashdlm:
            return f"FreeCache(flashdlm=True{self._compression_repr()})"
        return (
            f"FreeCache(suffix_window={self.suffix_window}, beyond_window={self.beyond_window!r}, "
            f"refresh_every={self.refresh_every}, freeze={self.freeze!r}, refresh_drift={self.refresh_drift}"
            f"{self._compression_repr()})"
        )

    def default_refresh_prompt(self) -> bool | None:
        # (KVReuseCache.__init__ calls this, before FreeCache's own options are set: hence `_periodic`.)
        if self.compression is not None:
            return False
        return True if self._periodic else None

    # ------------------------------------------------------------------ the rule, vectorised over rows

    row_state = {
        "token": False,  # freeze="token"
        "suffix_window": -1,  # -1: every later position
        "drop_beyond": False,  # beyond_window="drop"
        "delay": True,  # block freezing's delayed freeze (off for FlashDLM's)
        "refresh_every": 0,  # 0: never
        "drift": 0.0,  # the drift test's threshold (0: off)
        "probe_tokens": 0,
        "frozen_end": 0,  # block freezing: positions before it hold final KV
        "stale": False,  # the drift test fired: refresh at this step
    }
    column_state = {"final": (False, bool), "refreshed_tokens": (None, np.int64)}
    #: the last layer's values of each row at its last refresh ([R, W, Hkv, D], on the model's device)
    device_state = ("reference",)

    @property
    def refresh_lead(self) -> int:
        # a refresh of the canvas alone also feeds the prompt positions the drift test may probe, so
        # that their reference is the refresh's
        return self.probe_tokens if self.refresh_drift is not None else 0

    def row(self, request) -> dict:
        drift = self.refresh_drift is not None
        return {
            "token": self.freeze == "token", "suffix_window": -1 if self.suffix_window is None else self.suffix_window,
            "drop_beyond": self.beyond_window == "drop", "delay": not self.flashdlm,
            "refresh_every": self.refresh_every or 0, "drift": float(self.refresh_drift) if drift else 0.0,
            "probe_tokens": self.probe_tokens if drift else 0,
        }  # fmt: skip

    @classmethod
    def refresh(cls, b, rows):
        s = b.state
        forwards, every = s["forwards"][rows], s["refresh_every"][rows]
        periodic = (every > 0) & (forwards % np.maximum(every, 1) == 0)
        stale = s["stale"][rows]
        s["drift_refreshes"][rows] += stale & ~periodic & (forwards > 0)
        return periodic | stale

    @classmethod
    def feed(cls, b, rows, refresh):
        s, pos = b.state, b.pos
        start, end, length = b.start[rows], b.end[rows], s["length"][rows]
        window = s["suffix_window"][rows]
        window_end = np.where(window < 0, length, np.minimum(length, end + window))
        attend_end = np.where(s["drop_beyond"][rows], window_end, length)
        # block freezing: from the frozen boundary (every position before the active block is final
        # once this forward has run) through the window
        frozen_end = s["frozen_end"][rows]
        frozen = np.where(s["delay"][rows], frozen_end, np.maximum(frozen_end, start))
        win_start = np.minimum(frozen, start - b.shift)
        need = (pos >= win_start[:, None]) & (pos < window_end[:, None])
        s["frozen_end"][rows] = np.maximum(frozen_end, start)
        token = s["token"][rows]
        if token.any():  # token freezing: the positions whose KV is not final, the block's masks
            need = np.where(token[:, None], cls._not_final(b, rows, refresh, window_end), need)
        drift = (s["drift"][rows] > 0) & ~refresh
        if drift.any():
            need |= cls._probes(b, rows, need, drift)
        refreshing = (s["drift"][rows] > 0) & refresh  # their canvas is the drift test's reference now
        s["refreshed_tokens"][rows] = np.where(refreshing[:, None], s["canvas"][rows], s["refreshed_tokens"][rows])
        return need, attend_end

    @classmethod
    def _not_final(cls, b, rows, refresh, window_end) -> np.ndarray:
        """Token freezing [n, W]: the window's positions whose KV is not final, the still-masked block
        positions (and each one's predecessor, for a shifted model); the committed ones among them are
        final after this forward, and a refresh makes every committed position final."""
        s, pos = b.state, b.pos
        canvas, final = s["canvas"][rows], s["final"][rows]
        masked = (canvas == b.mask_id) & (pos >= b.start[rows, None]) & (pos < b.end[rows, None])
        token = ~final & (pos < window_end[:, None]) | masked
        if b.shift:
            token[:, : -b.shift] |= masked[:, b.shift :]
        committed = (canvas != b.mask_id) | (pos < s["prompt_len"][rows, None])  # a masked prompt (CFG) too
        is_token = s["token"][rows, None]
        again = refresh[:, None] & is_token
        s["final"][rows] = np.where(again, committed, final | (token & committed & is_token & ~refresh[:, None]))
        return token

    @classmethod
    def _probes(cls, b, rows, need, drift) -> np.ndarray:
        """The drift test's probes [n, W]: per `drift` row, its `probe_tokens` positions closest before
        the first it feeds whose tokens were committed at its last refresh (their inputs did not
        change since, like every frozen token's, so their fresh values measure the frozen KV's drift
        where the newly committed tokens act most)."""
        s, pos = b.state, b.pos
        first = np.where(need.any(-1), need.argmax(-1), 0)
        ready = (s["refreshed_tokens"][rows] != b.mask_id) & b.in_len[rows] & (pos < first[:, None])
        rank = ready[:, ::-1].cumsum(-1)[:, ::-1]  # 1 at the last ready position, 2 before it, ...
        probe = ready & (rank <= s["probe_tokens"][rows, None]) & drift[:, None]
        b.scratch[cls, "probe"] = (rows, probe)
        return probe

    @classmethod
    def observe(cls, b, rows, values):
        """The drift test: a refreshing row records its fresh last-layer values as its reference; a
        cached row's drift is the largest cosine distance of its probes' fresh values from that
        reference."""
        s = b.state
        drift_rows = s["drift"][rows] > 0
        if not drift_rows.any():
            return None
        index = np.arange(len(s["length"]))[rows]  # the batch rows of this rule
        refreshing = np.zeros(len(s["length"]), dtype=bool)
        refreshing[index] = b.refresh[rows] & drift_rows
        fed_row, fed_col = b.fed_row, b.fed_col
        reference = b.device_state["reference"]
        record = np.nonzero(refreshing[fed_row])[0]
        if len(record):
            at = b.to_device(record)
            reference[b.to_device(fed_row[record]), b.to_device(fed_col[record])] = values[at]
        probe_rows, probe = b.scratch.pop((cls, "probe"), (None, None))
        drift = torch.zeros(len(index), device=values.device)
        if probe is not None:
            probed = np.zeros((len(s["length"]), probe.shape[1]), dtype=bool)
            probed[np.arange(len(s["length"]))[probe_rows]] = probe
            tokens = np.nonzero(probed[fed_row, fed_col])[0]
            if len(tokens):
                rows_t, cols_t = b.to_device(fed_row[tokens]), b.to_device(fed_col[tokens])
                fresh, old = values[b.to_device(tokens)].float(), reference[rows_t, cols_t].float()
                distance = (1 - torch.nn.functional.cosine_similarity(fresh, old, dim=-1)).amax(-1)
                if len(index) == 1:  # (one row: its largest)
                    drift = distance.amax().clamp(min=0).reshape(1)
                else:
                    local = b.to_device(np.searchsorted(index, fed_row[tokens]))
                    drift = drift.scatter_reduce(0, local, distance, "amax")
        b.scratch[cls, "refreshing"] = refreshing[index]
        return drift

    @classmethod
    def observed(cls, b, rows, result):
        s = b.state
        refreshing = b.scratch.pop((cls, "refreshing"))
        drift_rows = s["drift"][rows] > 0
        # compared in float32, as the drift was measured
        s["stale"][rows] = (result.astype(np.float32) > s["drift"][rows].astype(np.float32)) & ~refreshing & drift_rows
