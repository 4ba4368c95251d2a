"""Write a world concept's MLLM data as a record directory (the layout of :mod:`unlearn.data.record_files`).

It is the worked example of the layout a user writes for a real model, and lets the record-file
path be checked against the world's own splits (the same records give the same metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data.record_files import write_records


def export_concept(concept: str, out: Path, images: int = 1, image_size: int = 48) -> Path:
    """``out``/concept.json + forget, retain, test, specificity, efficacy .jsonl + images/."""
    from .run_mllm import load_run_data

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    rd = load_run_data(concept, None, image_size, images)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "concept.json").write_text(json.dumps({"name": rd.names[0], "aliases": list(rd.names[1:])}, indent=1))
    parts = {"forget": rd.forget, "retain": rd.retain, "test": rd.evalset.test,
             "specificity": rd.evalset.retain, "efficacy": rd.evalset.efficacy}
    for part, records in parts.items():
        write_records(records, tmp / f"{part}.jsonl")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # complete or absent: never a half-written directory under the final name
    return out
