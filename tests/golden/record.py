"""Record the golden outputs: `python -m tests.golden.record [--only TEXT] [ARCH ...]` (default: every
architecture; `--only`: re-record just the cases whose name contains TEXT, keeping the others).

Each case is decoded alone, one request in its own `BatchedDecoder`, and written to
`tests/golden/<arch>.json` with the commit it was recorded at (per case, under "recorded_at").
Re-record only when a change of behaviour is meant, and say which cases changed and why in the
commit message.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from . import cases as golden


def commit() -> str:
    """HEAD's short hash, with "+" when the tree has changes not committed yet (then the next commit's
    message says which cases it records)."""
    run = dict(capture_output=True, text=True, cwd=golden.HERE)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    return head + ("+" if dirty else "")


def record_arch(arch: str, only: str, at: str) -> dict:
    """The cases of `arch` whose name contains `only`, decoded now, each marked as recorded `at`."""
    pipe = golden.build_pipe(arch)
    rows: dict = {}
    for cache in golden.caches(arch):
        for case in golden.cases(arch, cache):
            if only in case["name"]:
                (request,) = golden.make_requests(pipe, arch, cache, [case])
                rows[case["name"]] = golden.decode(pipe, [request])["0"]
    if not golden.block_diffusion(arch):
        for name, options in golden.PIPELINE_CASES.items():
            if only in f"pipeline/{name}":
                rows[f"pipeline/{name}"] = golden.pipeline_call(pipe, options)
    for row in rows.values():
        row["recorded_at"] = at
    return rows


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    only = ""
    if argv[:1] == ["--only"]:
        only, argv = argv[1], argv[2:]
    for arch in argv or list(golden.BUILDERS):
        data = golden.load(arch) if only and golden.path(arch).exists() else {"dtype": "float64", "cases": {}}
        new = record_arch(arch, only, commit())
        data["cases"].update(new)
        golden.path(arch).write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        print(f"{golden.path(arch)}: {len(new)} of {len(data['cases'])} cases recorded", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
