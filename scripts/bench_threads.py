"""How the compute-thread policy holds up when the CPU is shared: ms per denoising step of the bundled
tiny model, alone and beside another 2-thread torch job, for each policy.

    python scripts/bench_threads.py --out results/bench_threads.json

Policies (each measured in a fresh process, since OpenMP reads OMP_WAIT_POLICY when torch loads):
1 thread; every core with OpenMP's default waiting (idle threads spin for a while); every core with
OMP_WAIT_POLICY=PASSIVE (idle threads sleep: what `dlmcache serve` sets). The neighbour is a separate
process multiplying matrices on 2 threads for as long as the measurement runs. Each number is the
median over --repeats generations of 64 tokens, one per step (FreeCache, the server's default cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {
    "1 thread": {"threads": 1, "env": {}},
    "2 threads, OpenMP default wait": {"threads": 2, "env": {}},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
}


def child(threads: int, repeats: int) -> None:
    import torch

    from dlmcache import tinytask
    from dlmcache.serve import DEFAULT_CACHE, load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline("dlmcache/tiny", DEFAULT_CACHE)
    chat = tinytask.messages(tinytask.test_problems(1)[0])
    pipe(chat, max_new_tokens=64, block_length=32)
    times = []
    for _ in range(repeats):
        out = pipe(chat, max_new_tokens=64, block_length=32)
        times.append(1000 * out.stats["seconds"] / out.nfe)
    print(json.dumps({"ms_per_step": statistics.median(times), "all": times}))


NEIGHBOUR = """
import torch, time
torch.set_num_threads(2)
a = torch.randn(512, 512)
end = time.time() + {seconds}
while time.time() < end:
    a = torch.tanh(a @ a)
"""


def measure(policy: dict, repeats: int, loaded: bool) -> dict:
    env = {**os.environ, **policy["env"]}
    if "OMP_WAIT_POLICY" not in policy["env"]:
        env.pop("OMP_WAIT_POLICY", None)
    neighbour = None
    if loaded:
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR.format(seconds=600)])
        time.sleep(2)
    try:
        cmd = [sys.executable, __file__, "--child", str(policy["threads"]), "--repeats", str(repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.repeats)
    rows = {}
    for name, policy in POLICIES.items():
        rows[name] = {
            "quiet": measure(policy, args.repeats, loaded=False)["ms_per_step"],
            "beside a 2-thread job": measure(policy, args.repeats, loaded=True)["ms_per_step"],
        }
        print(name, rows[name], flush=True)
    print("\n| policy | ms/step, quiet | ms/step, beside a 2-thread torch job | slowdown |\n|---|---|---|---|")
    for name, r in rows.items():
        q, loaded = r["quiet"], r["beside a 2-thread job"]
        print(f"| {name} | {q:.1f} | {loaded:.1f} | {loaded / q:.1f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
