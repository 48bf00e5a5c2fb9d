"""Where a checkpoint lives: a bundled name ("dlmcache/tiny"), a local directory, or a hub repo id.

Kept free of torch, transformers and diffusers so that anything (the VLM helpers, scripts, tests) can
find the bundled assets without importing the diffusion-LM stack.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {
    "dlmcache/tiny": ASSETS / "tiny",
    "dlmcache/tiny-guide": ASSETS / "tiny-guide",
    "dlmcache/tiny-long": ASSETS / "tiny-long",
    "dlmcache/tiny-block": ASSETS / "tiny-block",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_path(name_or_path: str | os.PathLike) -> str:
    """A bundled name's directory; an existing local path as is; a hub repo id ("org/name") as is.

    Raises `FileNotFoundError` for something that can only be a local path (absolute, starting with
    "." or "~", or not a valid repo id) and does not exist, instead of letting the hub complain
    about a repo id.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint is a path or a hub id string, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if text in BUNDLED:
        return str(BUNDLED[text])
    local = Path(text).expanduser()
    if local.is_file():
        raise NotADirectoryError(f"{text!r} is a file; a checkpoint is a directory (config.json, safetensors, ...)")
    if local.exists():
        return str(local)
    if isinstance(name_or_path, os.PathLike) or text.startswith((".", "~", "/")) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"{text!r}: no such local file or directory (and not a hub repo id)")
    return text


def read_json(path_or_id: str, filename: str) -> dict | None:
    """`filename` parsed from a local directory or (online only) a hub repo; None when the directory
    or repo has no such file. It must hold a JSON object; errors name the file."""
    local = Path(path_or_id)
    if local.is_dir():
        f = local / filename
        return json_object(f) if f.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return json_object(Path(hf_hub_download(path_or_id, filename)))
    except EntryNotFoundError:
        return None


def json_object(path: Path) -> dict:
    """The JSON object in file `path`; `ValueError` naming the file when it is not valid JSON, not
    UTF-8, or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
