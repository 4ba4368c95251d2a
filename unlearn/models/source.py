"""A model given as a local directory or a hub id, checked before anything loads: a missing path, a
folder that holds no checkpoint, or a hub id that cannot be reached offline is an error saying how to
fix it (the libraries' own errors come after long retries or name neither)."""

from __future__ import annotations

from pathlib import Path


def checked_source(model, marker: str, what: str = "model") -> str:
    """``model`` as the loaders take it: a directory holding ``marker`` (``config.json``,
    ``model_index.json``), or a hub id (owner/name) that is cached or can be downloaded; ``what`` names
    it in errors."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise FileNotFoundError(f"{what} {model}: the folder holds no {marker}, so it is not a checkpoint; give the "
                                    f"directory that save_pretrained wrote (or a hub id, owner/name)")
        return str(path)
    if path.exists():
        raise ValueError(f"{what} {model} is a file; give the checkpoint's directory (or a hub id, owner/name)")
    owner, sep, name = str(model).partition("/")
    if not (sep and owner and name) or "/" in name or str(model).startswith((".", "~")):
        raise FileNotFoundError(f"{what} {model!r}: no such directory, and not a hub id (owner/name); fix the path, or "
                                f"use 'world' or a hub id")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(str(model), marker), str):
        raise FileNotFoundError(f"{what} {model!r} is not in the local Hugging Face cache and the hub cannot be reached "
                                f"offline (HF_HUB_OFFLINE=1): download it where there is a network (huggingface-cli "
                                f"download {model}) and give its local directory, or unset HF_HUB_OFFLINE")
    return str(model)


def check_weights(path: Path) -> None:
    """A safetensors file that is whole: its header reads and its tensors fit the file (a truncated or
    damaged file is an error naming it, not a traceback from the loader)."""
    from safetensors import SafetensorError, safe_open

    from knowtrace.files import regular_file

    try:
        with safe_open(str(regular_file(path, "weights file")), "pt") as f:
            f.keys()
    except SafetensorError as e:
        raise ValueError(f"weights file {path} is damaged ({e}); the trained parameters cannot be read: restore the "
                         f"file, or run the training again") from None
