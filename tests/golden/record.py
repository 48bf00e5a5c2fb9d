"""Record the golden outputs: `python -m tests.golden.record [ARCH ...]` (default: every architecture).

Each case is decoded alone, one request in its own `BatchedDecoder`, and written to
`tests/golden/<arch>.json` with the commit it was recorded at. Re-record only when a change of
behaviour is meant, and say which cases changed and why in the commit message.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from . import cases as golden


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=golden.HERE)
    return out.stdout.strip() or "unknown"


def record_arch(arch: str) -> dict:
    pipe = golden.build_pipe(arch)
    rows: dict = {}
    for cache in golden.caches(arch):
        items = golden.cases(arch, cache)
        for i, case in enumerate(items):
            (request,) = golden.make_requests(pipe, arch, cache, [case])
            rows[case["name"]] = golden.decode(pipe, [request])["0"]
            print(f"{arch} {case['name']}: {rows[case['name']]['steps']} forwards", file=sys.stderr)
    if not golden.block_diffusion(arch):
        for name, options in golden.PIPELINE_CASES.items():
            rows[f"pipeline/{name}"] = golden.pipeline_call(pipe, options)
    return rows


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    for arch in argv or list(golden.BUILDERS):
        data = {"recorded_at": commit(), "dtype": "float64", "cases": record_arch(arch)}
        golden.path(arch).write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        print(f"wrote {golden.path(arch)} ({len(data['cases'])} cases)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
