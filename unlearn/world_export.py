"""Write a world concept's data as a record directory: MLLM (:func:`export_concept`, the layout of
:mod:`unlearn.data.record_files`) or SD (:func:`export_sd_concept`, :mod:`unlearn.data.sd_record_files`).

It is the worked example of the layout a user writes for a real model, and lets the record-file
path be checked against the world's own splits (the same records give the same metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

from .data.record_files import write_records


def check_out(out: Path) -> None:
    """``out`` absent or an empty folder."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise FileExistsError(f"--out {out} {what}; choose another --out (a new or empty folder)")


def export_concept(concept: str, out: Path, images: int = 1, image_size: int = 48) -> Path:
    """``out``/concept.json + forget, retain, test, specificity, efficacy .jsonl + images/."""
    from .run_mllm import world_data
    from .world.concepts import get_concept
    from .world.records import world_eval_set

    out = Path(out)
    if images < 1:
        raise ValueError(f"--images {images}: a record directory needs at least 1 image of the concept")
    check_out(out)
    c, forget, retain = world_data(get_concept(concept).key, images, image_size=image_size)
    evalset = world_eval_set(c.key, image_size, n_images=images)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "concept.json").write_text(json.dumps({"name": c.names[0], "aliases": list(c.names[1:])}, indent=1))
    parts = {"forget": forget, "retain": retain, "test": evalset.test, "specificity": evalset.retain,
             "efficacy": evalset.efficacy}
    for part, records in parts.items():
        write_records(records, tmp / f"{part}.jsonl")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # complete or absent: never a half-written directory under the final name
    return out


def export_sd_concept(concept: str, out: Path, images: int = 5, references: int = 10, model: str = "world",
                      world_dir=None, world_seed: int = 0) -> Path:
    """A world concept's SD data as an SD record directory (:mod:`unlearn.data.sd_record_files`):
    concept.json, forget.jsonl (``images`` rendered unlearning images with their exact masks as PNG),
    retain.jsonl (the other concepts' images and the background surrogates), eval.json (the
    canonical prompt for UA; every other concept retained, with ``references`` world test renders
    each as its FD reference images). Images are rendered at the world SD's resolution (of ``model``,
    a world SD directory, or the cached one), so a run from the directory trains on the same pixels."""
    from PIL import Image

    from .data.sd_record_files import write_sd_records
    from .world.concepts import BY_KEY, get_concept
    from .world.records import world_sd_data
    from .world.render import world_image
    from .world.sd import concept_prompt, load_sd_config

    out = Path(out)
    if images < 1 or references < 2:
        raise ValueError(f"--images {images} --references {references}: an SD record directory needs at least 1 image "
                         f"of the concept and 2 FD reference images per retained concept")
    check_out(out)
    c = get_concept(concept)
    if model == "world":
        from .world.build import build_world

        model = build_world(world_dir, only=("sd",))["sd"]
    size = load_sd_config(Path(model)).image_size
    forget, retain = world_sd_data(c.key, images, size, world_seed)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "concept.json").write_text(json.dumps({"name": c.name, "aliases": list(c.aliases)}, indent=1))
    write_sd_records(forget, tmp / "forget.jsonl")
    write_sd_records(retain, tmp / "retain.jsonl")
    others = [k for k in BY_KEY if k != c.key]
    (tmp / "references").mkdir()
    refs = {}
    for k in others:
        refs[k] = []
        for i in range(references):
            Image.fromarray(world_image(k, "test", i, size, world_seed).image).save(tmp / "references" / f"{k}-{i}.png")
            refs[k].append(f"references/{k}-{i}.png")
    # labels are world keys, so the world classifier (--classifier world) can score the run
    spec = {"prompts": [concept_prompt(c)], "label": c.key, "retained": {k: concept_prompt(BY_KEY[k]) for k in others},
            "references": refs}
    (tmp / "eval.json").write_text(json.dumps(spec, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # complete or absent
    return out
