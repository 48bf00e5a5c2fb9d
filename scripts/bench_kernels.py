"""Correctness, then speed, of the Triton kernels against torch.

    python scripts/bench_kernels.py --out results/kernels        # on a CUDA machine
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --check-only   # CPU: correctness only

For every shape it first checks the kernel against its torch reference (float32 reference, bf16
inputs), then times (CUDA events via triton.testing.do_bench, median):
  attention        decode-shaped (Lq=1, GQA) and chunk-shaped queries vs torch SDPA (enable_gqa)
  quantized int4/2 fused dequant-attention vs bf16 SDPA and vs eager dequantize + SDPA
  quantize, gather KV compaction
and reports achieved memory bandwidth (bytes the kernel must read and write / time) as a fraction of
the device's peak (--peak-gbps; H100 SXM 3350 GB/s by default). Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def peak_gbps(default: float) -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    table = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
    return next((v for k, v in table.items() if k in name), default)


def bench(fn) -> float:
    """Median milliseconds of fn() on CUDA."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def attention_cases(check_only: bool):
    # (name, B, Hq, Hkv, Lq, Lk, D)
    if check_only:
        return [("decode", 2, 8, 2, 1, 320, 128), ("chunk", 1, 8, 2, 32, 224, 64)]
    cases = []
    for lk in (1024, 4096, 16384, 65536):
        cases.append((f"decode B=8 Lk={lk}", 8, 32, 8, 1, lk, 128))
    for lk in (4096, 16384):
        cases.append((f"chunk32 B=4 Lk={lk}", 4, 32, 8, 32, lk, 128))
    return cases


def attention_row(name: str, q, k, v, timed: bool, peak: float) -> dict:
    """Check and time one attention shape: ours (bf16, int4, int2) against SDPA and eager dequant."""
    from dlmcache.kernels.ops.attention import attention_reference
    from dlmcache.kernels.ops.attention import triton as att
    from dlmcache.kernels.ops.attention.reference import attention_mask
    from dlmcache.kernels.ops.quantize import triton as qua
    from dlmcache.kernels.ops.quantized_attention import reference as qatt_ref
    from dlmcache.kernels.ops.quantized_attention import triton as qatt

    lq, lk = q.shape[2], k.shape[2]
    causal = lq > 1  # chunk-shaped queries are the last lq tokens (bottom-right causal)
    sdpa_mask = attention_mask(lq, lk, None, None, True, q.device) if causal else None

    def sdpa(kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=sdpa_mask, enable_gqa=True)

    ours = att.attention(q, k, v, causal=causal)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    row = {"op": "attention", "case": name, "max_abs_err": (ours.float() - ref).abs().max().item()}
    kv_bytes = 2 * k.numel() * k.element_size()
    if timed:
        row["ours_ms"] = bench(lambda: att.attention(q, k, v, causal=causal))
        row["sdpa_ms"] = bench(lambda: sdpa(k, v))
        row["bytes"] = kv_bytes
        row["bw_fraction"] = kv_bytes / (row["ours_ms"] * 1e-3) / 1e9 / peak
        row["sdpa_bw_fraction"] = kv_bytes / (row["sdpa_ms"] * 1e-3) / 1e9 / peak
    for bits in (4, 2):
        kq, vq = qua.quantize_kv(k, bits, 32, "channel"), qua.quantize_kv(v, bits, 32, "token")
        got = qatt.quantized_attention(q, kq, vq, causal=causal)
        want = qatt_ref.quantized_attention(q.float(), kq, vq, causal=causal)
        row[f"int{bits}_max_abs_err"] = (got.float() - want).abs().max().item()
        if timed:
            ms = bench(lambda kq=kq, vq=vq: qatt.quantized_attention(q, kq, vq, causal=causal))
            row[f"int{bits}_ms"] = ms
            row[f"int{bits}_bytes"] = kq.nbytes + vq.nbytes
            row[f"int{bits}_bw_fraction"] = (kq.nbytes + vq.nbytes) / (ms * 1e-3) / 1e9 / peak
            row[f"int{bits}_eager_ms"] = bench(lambda kq=kq, vq=vq: sdpa(qua.dequantize_kv(kq), qua.dequantize_kv(vq)))
            row[f"int{bits}_speedup_vs_sdpa_bf16"] = row["sdpa_ms"] / ms
    return row


def run(args) -> dict:
    from dlmcache.kernels.ops.gather import triton as gat
    from dlmcache.kernels.ops.quantize import reference as qref
    from dlmcache.kernels.ops.quantize import triton as qua

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    timed = not args.check_only
    if timed and device != "cuda":
        raise SystemExit("timing needs a CUDA device; use --check-only (with TRITON_INTERPRET=1) on CPU")
    peak = args.peak_gbps or peak_gbps(3350.0)
    rows = []
    for name, b, hq, hkv, lq, lk, d in attention_cases(args.check_only):
        q = torch.randn(b, hq, lq, d, device=device, dtype=dtype)
        k = torch.randn(b, hkv, lk, d, device=device, dtype=dtype)
        v = torch.randn(b, hkv, lk, d, device=device, dtype=dtype)
        row = attention_row(name, q, k, v, timed, peak)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Quantize and gather.
    x = torch.randn(4, 8, 4096 if timed else 128, 128, device=device, dtype=dtype)
    for bits in (8, 4, 2):
        got, want = qua.quantize_kv(x, bits, 32, "token"), qref.quantize_kv(x, bits, 32, "token")
        row = {"op": "quantize", "case": f"int{bits} token g32", "exact": bool(torch.equal(got.data, want.data))}
        if timed:
            row["ms"] = bench(lambda bits=bits: qua.quantize_kv(x, bits, 32, "token"))
            row["bw_fraction"] = (x.numel() * x.element_size() + got.nbytes) / (row["ms"] * 1e-3) / 1e9 / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    keep = x.shape[2] // 5
    index = torch.rand(x.shape[:3], device=device).topk(keep, -1).indices.sort(-1).values
    out_k, out_v = torch.empty_like(x[:, :, :keep]), torch.empty_like(x[:, :, :keep])
    got = gat.gather_kv(x, x, index, out_k, out_v)[0]
    row = {
        "op": "gather",
        "case": f"keep {keep}/{x.shape[2]}",
        "exact": bool(torch.equal(got, x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[3])))),
    }
    if timed:
        row["ms"] = bench(lambda: gat.gather_kv(x, x, index, out_k, out_v))
        row["bw_fraction"] = 4 * out_k.numel() * x.element_size() / (row["ms"] * 1e-3) / 1e9 / peak
    rows.append(row)
    print(json.dumps(row), flush=True)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
        "peak_gbps": peak if timed else None,
        "torch": torch.__version__,
        "rows": rows,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["op"] == "attention" and "bw_fraction" in r]
    if not rows:
        return
    names = [r["case"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, (key, label) in enumerate(
        [
            ("bw_fraction", "ours bf16"),
            ("sdpa_bw_fraction", "torch SDPA bf16"),
            ("int4_bw_fraction", "ours int4"),
            ("int2_bw_fraction", "ours int2"),
        ]
    ):
        ax.bar([j + i * width for j in range(len(rows))], [r.get(key, 0) for r in rows], width, label=label)
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"fraction of peak bandwidth ({result['peak_gbps']:.0f} GB/s)")
    ax.set_title(result["device"])
    ax.axhline(0.75, color="gray", ls="--", lw=1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results")) / "kernels")
    ap.add_argument("--check-only", action="store_true", help="correctness on small shapes, no timing")
    ap.add_argument("--peak-gbps", type=float, default=None)
    args = ap.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_kernels.json").write_text(json.dumps(result, indent=1))
    if not args.check_only:
        plot(result, args.out / "bench_kernels.png")


if __name__ == "__main__":
    main()
