"""The world cache: trained world components, each in its own verified directory.

A component (``mllm``, ``sd``, ``classifier``) is built into a temporary directory next to its final
place and renamed into place only once complete, with ``complete.json`` listing the build config
and the SHA-256 of every file. Loading checks that record against the files on disk, so a partial
build (a crash, a full disk) or a corrupted file is detected, reported with the reason, and rebuilt;
it is never used.

Location: ``--out`` on the command line, else ``$UNLEARN_WORLD_DIR``, else
``$XDG_CACHE_HOME/unlearn/world`` (``~/.cache/unlearn/world``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "UNLEARN_WORLD_DIR"
RECORD = "complete.json"
FORMAT_VERSION = 1  # bump when the on-disk layout of a component changes


def default_cache_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unlearn" / "world"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(message: str) -> None:
    print(f"[unlearn world] {message}", file=sys.stderr, flush=True)


def check_component(root: Path, name: str, config: dict) -> str | None:
    """None if ``root/name`` is complete, intact and built from ``config``; else the reason not."""
    config = json.loads(json.dumps(config))  # as stored: tuples become lists
    path = Path(root) / name
    if not path.exists():
        return "not built yet"
    record_path = path / RECORD
    if not record_path.exists():
        return f"{record_path} is missing (an interrupted build?)"
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{record_path} is unreadable ({e})"
    if record.get("format") != FORMAT_VERSION or record.get("config") != config:
        return "it was built with another configuration"
    for rel, digest in record.get("files", {}).items():
        f = path / rel
        if not f.exists():
            return f"file {f} is missing"
        if _sha256(f) != digest:
            return f"file {f} is corrupted (checksum mismatch)"
    return None


def ensure_component(root: Path, name: str, config: dict, build: Callable[[Path], None]) -> Path:
    """Return ``root/name``, building it with ``build(tmp_dir)`` unless a verified copy exists."""
    root = Path(root)
    path = root / name
    reason = check_component(root, name, config)
    if reason is None:
        return path
    _say(f"world component {name!r} at {path} cannot be used: {reason}; rebuilding it" if path.exists()
         else f"building world component {name!r} into {path}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"format": FORMAT_VERSION, "config": json.loads(json.dumps(config)), "files": files}
        (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # atomic on one filesystem: the component appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
