"""SD record files: the forget / retain / evaluation data of a Stable Diffusion run, as a directory.

    DATA/
      concept.json    {"name": "Elon Musk", "aliases": ["Musk"]}   optional "allow_outside_paths": true
      forget.jsonl    what is unlearned: images of the concept, prompts that name it, concept masks
      retain.jsonl    optional: images of other concepts with their prompts (SalUn, SA, ...)
      eval.json       how the run is evaluated (UA prompts, retained concepts and their reference images)
      images/ masks/  optional: the files the records point to

forget.jsonl / retain.jsonl: one JSON object per line, keys
    id        unique within the file (default "<file>:<line>")
    image     path relative to DATA: PNG or JPEG (every mode Pillow reads: knowtrace.files.read_image). Paths
              (image, mask, references) that leave DATA are refused unless concept.json says
              "allow_outside_paths": true (as in unlearn.data.record_files)
    prompt    the prompt the image is trained with (forget: must name the concept or an alias)
    mask      forget only, optional: the concept's pixels, a PNG (white = concept, same size as the
              image) or a labelme JSON (polygons / rectangles); needed by the methods that weight
              pixels (fttp, fttp_dilated)
    concept   optional: the concept shown (retain: another concept; omit for a background image)

eval.json:
    {"prompts":    ["a photo of Elon Musk", ...],       UA: images generated for each prompt and
                                                         seed that the classifier does not label as
                                                         the concept; every prompt names it
     "label":      "Elon Musk",                          optional: the classifier's label for the
                                                         concept (default: the concept's name)
     "retained":   {"Bill Gates": "a photo of Bill Gates", ...},   kept concepts, label -> prompt:
                                                         their generated images give the FD and the
                                                         per-concept recognition
     "references": {"Bill Gates": ["images/gates-0.png", ...], ...},  FD reference images of every
                                                         retained label (the first --fd-seeds of each
                                                         are used; resized and centre-cropped to the
                                                         model's resolution)
     "labels":     ["a man", "a woman"]}                 optional: more labels for a zero-shot
                                                         classifier to choose among

Every problem is an error naming the file and line (or key) and how to fix it, raised when the
directory is read, before a model is loaded or a run directory is written. ``unlearn world
export-sd`` writes a world concept in this layout, which is also a worked example.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from knowtrace.files import read_image, read_json

from .record_files import jsonl_rows, read_concept, record_directory, record_path
from .sd_masks import load_mask
from .names import names_in
from .sd_records import SDRecord

KEYS = ("id", "image", "prompt", "mask", "concept")
EVAL_KEYS = ("prompts", "label", "retained", "references", "labels")


@dataclass
class SDEvalSpec:
    label: str  # the classifier's label for the concept
    prompts: list[str]  # UA prompts
    retained: dict[str, str]  # label -> prompt
    references: dict[str, list[Path]]  # label -> FD reference image files
    labels: list[str] = field(default_factory=list)  # extra labels for zero-shot classifiers

    def classifier_labels(self) -> list[str]:
        """Every label a zero-shot classifier chooses among: the concept's, the retained, the extra ones."""
        return list(dict.fromkeys([self.label, *self.retained, *self.labels]))

    def reference_images(self, labels, per_label: int, size: int) -> np.ndarray:
        """(N, size, size, 3) uint8: the first ``per_label`` references of each label, in order."""
        from .sd_masks import resize_crop

        out = []
        for label in labels:
            for path in self.references[label][:per_label]:
                out.append(resize_crop(_read_rgb(path, f"eval.json references[{label!r}]"), None, size)[0])
        return np.stack(out)


@dataclass
class SDRecordData:
    name: str
    aliases: tuple[str, ...]
    forget: list[SDRecord]
    retain: list[SDRecord]
    eval: SDEvalSpec

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _read_rgb(path: Path, what: str) -> np.ndarray:
    return np.asarray(read_image(path, what))


def read_sd_records(path: Path, names=None, need_masks: bool = False, base: Path | None = None,
                    allow_outside: bool = False, mask_reason: str = "this method needs a concept mask") -> list[SDRecord]:
    """Records from a JSONL file. ``names``: the concept's names, which every prompt must contain
    (forget records); masks are loaded and checked against their image (size, not empty, not full);
    ``need_masks``: a record without one is an error saying ``mask_reason``.
    File paths are relative to ``base`` (default: the file's folder) and stay inside it unless ``allow_outside``."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    records = []
    for where, row, rid in jsonl_rows(path, KEYS, ("image", "prompt")):
        image_path = record_path(row["image"], base, f"{where}: image", allow_outside)
        image = _read_rgb(image_path, f"{where}: image")
        if names is not None and not names_in(row["prompt"], names):
            raise ValueError(f"{where}: prompt {row['prompt']!r} does not name the concept ({', '.join(names)}); "
                             f"a forget prompt must contain its name or an alias (or add the alias to concept.json)")
        mask = None
        if row.get("mask"):
            mask = record_path(row["mask"], base, f"{where}: mask", allow_outside)
            m = load_mask(mask, where)
            if m.shape != image.shape[:2]:
                raise ValueError(f"{where}: mask {mask} is {m.shape[0]}x{m.shape[1]} but its image is "
                                 f"{image.shape[0]}x{image.shape[1]}: give a mask of the image's size")
            if not m.any() or m.all():
                raise ValueError(f"{where}: mask {mask} is {'empty' if not m.any() else 'the whole image'}; "
                                 f"mark the concept's pixels (white) and nothing else")
        elif need_masks:
            raise ValueError(f"{where}: {mask_reason}; add \"mask\": a PNG or labelme JSON path")
        if not isinstance(row.get("concept", ""), str):
            raise ValueError(f"{where}: concept must be text")
        records.append(SDRecord(rid, row["prompt"], image_path, row.get("concept"), mask))
    if not records:
        raise ValueError(f"record file {path} holds no records")
    return records


def read_eval_spec(data: Path, name: str, names, allow_outside: bool = False) -> SDEvalSpec:
    path = Path(data) / "eval.json"
    if not path.exists():
        raise FileNotFoundError(f"{data}: no eval.json; write {{\"prompts\": [...], \"retained\": {{label: prompt}}, "
                                f"\"references\": {{label: [image paths]}}}} there (layout: help(unlearn.data.sd_record_files))")
    spec = read_json(path, "evaluation file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: must be a JSON object with keys {', '.join(EVAL_KEYS)}")
    unknown = sorted(set(spec) - set(EVAL_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(EVAL_KEYS)}")
    prompts = spec.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path}: \"prompts\" must be a non-empty list of the concept's prompts (for UA)")
    for i, p in enumerate(prompts):
        if not names_in(p, names):
            raise ValueError(f"{path}: prompts[{i}] {p!r} does not name the concept ({', '.join(names)})")
    label = spec.get("label", name)
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"{path}: \"label\" must be the classifier's label for the concept")
    retained = spec.get("retained")
    if not isinstance(retained, Mapping) or not retained or \
            not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in retained.items()):
        raise ValueError(f"{path}: \"retained\" must map each kept concept's label to its prompt (for the FD)")
    if label in retained:
        raise ValueError(f"{path}: the concept's label {label!r} cannot also be retained")
    refs = spec.get("references")
    if not isinstance(refs, Mapping):
        raise ValueError(f"{path}: \"references\" must map each retained label to a list of reference image paths")
    lacking = [k for k in retained if not refs.get(k)]
    if lacking:
        raise ValueError(f"{path}: no reference images for retained label(s) {lacking}; add them under \"references\"")
    references = {}
    for k in retained:
        if not isinstance(refs[k], list) or not all(isinstance(p, str) for p in refs[k]):
            raise ValueError(f"{path}: references[{k!r}] must be a list of image paths")
        where = [f"{path} references[{k!r}][{j}]" for j in range(len(refs[k]))]
        references[k] = [record_path(p, Path(data), w, allow_outside) for p, w in zip(refs[k], where)]
        for p, w in zip(references[k], where):
            _read_rgb(p, w)
    extra = spec.get("labels", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) and x.strip() for x in extra):
        raise ValueError(f"{path}: \"labels\" must be a list of label strings")
    return SDEvalSpec(label, list(prompts), dict(retained), references, list(extra))


def load_sd_record_data(data: Path, need_masks: bool = False) -> SDRecordData:
    """Read an SD data directory (layout in the module docs), checking every record."""
    data = record_directory(data)
    name, aliases, outside = read_concept(data)
    names = (name, *aliases)
    forget = read_sd_records(data / "forget.jsonl", names, need_masks, base=data, allow_outside=outside)
    retain = read_sd_records(data / "retain.jsonl", base=data, allow_outside=outside) \
        if (data / "retain.jsonl").exists() else []
    return SDRecordData(name, aliases, forget, retain, read_eval_spec(data, name, names, outside))


def write_sd_records(records: list[SDRecord], path: Path) -> None:
    """Write records as JSONL with their images (and masks, as 0/255 PNG) under images/ and masks/,
    one file per record named by its id."""
    path = Path(path)
    lines = []
    for n, r in enumerate(records):
        stem = f"{path.stem}-{n}"
        (path.parent / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(r.image, dtype=np.uint8)).save(path.parent / "images" / f"{stem}.png")
        row = {"id": r.id, "image": f"images/{stem}.png", "prompt": r.prompt}
        if r.mask is not None:
            (path.parent / "masks").mkdir(exist_ok=True)
            Image.fromarray(np.asarray(r.mask, dtype=bool).astype(np.uint8) * 255).save(path.parent / "masks" / f"{stem}.png")
            row["mask"] = f"masks/{stem}.png"
        if r.concept:
            row["concept"] = r.concept
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
