"""KV compression in a GUI agent's screenshot loop: memory, speed and fidelity per method and budget.

    python scripts/bench_vlm.py --out results/bench_vlm.json                  # tiny random Qwen2-VL, CPU
    python scripts/bench_vlm.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --dtype bfloat16 \\
        --size 1288x728 --out $OUT/bench_vlm.json                           # a real checkpoint

Synthetic screenshots (drawn with PIL: a desktop with a window, buttons, a text field whose text grows
by a few characters each turn and a moving cursor) drive `--turns`-turn sessions (`vlm.GUIAgentSession`)
with every configuration: the full cache re-prefilled each turn (what agents do today), the full cache
reused across turns, and GUI-KV, PrefixKV (calibrated on separate screenshots at each budget), SnapKV
and StreamingLLM at each budget (fraction of the KV kept). Per config: KV bytes after the last turn
(and the ratio to the full cache), prefill seconds per turn, seconds per decoded token at the last
turn, and fidelity against the full cache given the same history: top-1 agreement of the generated
action tokens (teacher-forced on the full cache's actions, so one early difference does not decide
every later turn) and KL(full || compressed) of the first action token's distribution. Timings are
medians over `--repeats` runs in this one process. Writes JSON and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from dlmcache.vlm import GUIAgentSession
from dlmcache.vlm.methods import METHODS, session_compression
from dlmcache.vlm.synthetic import instruction, screenshot


def load(args):
    if args.model == "tiny":
        from dlmcache.vlm.tiny import tiny_processor, tiny_vlm

        processor = tiny_processor(max_pixels=args.size[0] * args.size[1])
        model = tiny_vlm(processor, args.kind, layers=args.layers, hidden=args.hidden, dtype=getattr(torch, args.dtype))
        return model.to(args.device), processor
    from dlmcache.vlm.loading import load_vlm

    return load_vlm(args.model, getattr(torch, args.dtype), args.device)


def configs(args, model, processor) -> list[tuple[str, float, dict]]:
    out = [("full, re-prefilled", 1.0, {"reuse_cache": False}), ("full, reused", 1.0, {})]
    calib = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": screenshot(t, args.size, seed=100 + t)},
                    {"type": "text", "text": instruction(t)},
                ],
            }
        ]
        for t in range(args.calibration)
    ]
    for b in args.budgets:
        for method in METHODS:
            out.append((f"{method} {b:.0%}", b, session_compression(method, b, model, processor, calib)))
    return out


@torch.no_grad()
def run_session(model, processor, args, shots, forced=None, **kwargs):
    """One session over all turns; with `forced` (the reference's actions) every turn's action is
    teacher-forced and the agreement of greedy decoding with it recorded."""
    session = GUIAgentSession(model, processor, max_new_tokens=args.max_new_tokens, **kwargs)
    actions, first_logits, agree = [], [], []
    for t, shot in enumerate(shots):
        session.step(shot, instruction(t), action_ids=None if forced is None else forced[t])
        actions.append(session.history[-1]["generated"])
        first_logits.append(session.last_logits)
        agree.append(session.last_agreement)
    return session, actions, first_logits, agree


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random Qwen2-VL) or a Qwen2-VL / Qwen2.5-VL checkpoint")
    ap.add_argument("--kind", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"], help="tiny model's architecture")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--size", default="448x448", help="screenshot WxH")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--budgets", default="0.5,0.2,0.1")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=3, help="PrefixKV calibration prompts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("results/bench_vlm.json"))
    args = ap.parse_args()
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(args)
    shots = [screenshot(t, args.size) for t in range(args.turns)]

    _, ref_actions, ref_logits, _ = run_session(model, processor, args, shots)
    results = {}
    for name, budget, kwargs in configs(args, model, processor):
        timings = []
        for _ in range(args.repeats):
            session, *_ = run_session(model, processor, args, shots, **kwargs)
            timings.append(session.stats)
        _, _, logits, agree = run_session(model, processor, args, shots, forced=ref_actions, **kwargs)
        last = [stats[-1] for stats in timings]
        results[name] = {
            "budget": budget,
            "kv_bytes": last[0].kv_bytes,
            "kept_tokens": last[0].kept_tokens,
            "seen_tokens": last[0].seen_tokens,
            "prefill_seconds_per_turn": statistics.median(
                statistics.mean(s.prefill_seconds for s in stats) for stats in timings),
            "decode_seconds_per_token_last_turn": statistics.median(s.decode_seconds_per_token for s in last),
            "top1_agreement": statistics.mean(agree),
            "first_token_kl": statistics.mean(kl(r, c) for r, c in zip(ref_logits, logits, strict=True)),
            "per_turn": [  # medians over the repeats, turn by turn
                {
                    "kv_bytes": turns[0].kv_bytes,
                    "kept_tokens": turns[0].kept_tokens,
                    "seen_tokens": turns[0].seen_tokens,
                    "prefill_seconds": statistics.median(t.prefill_seconds for t in turns),
                    "decode_seconds_per_token": statistics.median(t.decode_seconds_per_token for t in turns),
                }
                for turns in zip(*timings, strict=True)
            ],
        }  # fmt: skip
        print(name, {k: round(v, 5) if isinstance(v, float) else v for k, v in results[name].items()}, flush=True)
    full = results["full, reused"]
    for r in results.values():
        r["kv_ratio"] = r["kv_bytes"] / full["kv_bytes"]
        r["decode_speedup"] = full["decode_seconds_per_token_last_turn"] / r["decode_seconds_per_token_last_turn"]
    print(
        f"\n{args.turns} screenshots of {args.size[0]}x{args.size[1]}, "
        f"{full['seen_tokens']} tokens seen at the last turn"
    )
    print(
        "| config | KV bytes (x full) | prefill s / turn | decode ms / token (speedup) | "
        "top-1 agreement | first-token KL |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['kv_bytes'] / 2**20:.2f} MiB ({r['kv_ratio']:.2f}x) | "
            f"{r['prefill_seconds_per_turn']:.3f} | "
            f"{1000 * r['decode_seconds_per_token_last_turn']:.2f} ({r['decode_speedup']:.2f}x) | "
            f"{r['top1_agreement']:.3f} | {r['first_token_kl']:.4f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"args": meta, "device": args.device, "results": results}, indent=1))
    plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted((r["kv_ratio"], r["top1_agreement"]) for n, r in results.items() if n.startswith(method))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(results["full, reused"]["top1_agreement"], color="gray", ls="--", label="full cache")
    ax.set_xlabel("KV bytes / full cache")
    ax.set_ylabel("top-1 agreement with full cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
