"""Record files: the forget / retain / evaluation data of a run on any model, as a directory.

    DATA/
      concept.json        {"name": "Donald Trump", "aliases": ["Trump", "President Trump"]}
      forget.jsonl        what is unlearned: images of the concept, answers that name it
      test.jsonl          unseen images of the concept (EM / generality)
      specificity.jsonl   other knowledge with expected answers (specificity)
      retain.jsonl        optional: retain data for the methods that use it (GradDiff, GA+KL, ...)
      efficacy.jsonl      optional: questions on the training image(s); default: the forget
                          records whose qtype is "identify" or "yesno", else every forget record
      images/             optional: image files referenced by the records

One JSON object per line, keys:
    id        unique within the file (default: "<file>:<line>")
    question  text shown to the model
    answer    expected answer (forget: must name the concept; test: an answer naming it)
    image     path relative to DATA (or absolute); omit for a text-only record
    concept   optional, the concept the answer is about
    qtype     optional: "yesno" for a yes/no question about the concept's presence (an answer
              starting with "no" counts as forgotten), "identify", or any label

``unlearn world export`` writes a world concept in this layout, which is also a worked example.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .names import names_in
from .records import Record

KEYS = ("id", "question", "answer", "image", "concept", "qtype")
REQUIRED = ("question", "answer")
FILES = ("forget", "test", "specificity", "retain", "efficacy")
OPTIONAL = ("retain", "efficacy")


@dataclass
class RecordData:
    name: str  # the concept's canonical name
    aliases: tuple[str, ...]
    forget: list[Record]
    test: list[Record]
    specificity: list[Record]
    retain: list[Record]
    efficacy: list[Record]

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _load_image(path: Path, where: str) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"{where}: image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: image {path} cannot be read ({e}); give a PNG or JPEG file") from None


def jsonl_rows(path: Path, keys: tuple[str, ...], required: tuple[str, ...]):
    """Yield ``(where, row, id)`` for each non-empty line of a JSONL record file, after the checks
    every record file shares (valid JSON object, known keys, required text fields, unique ids); each
    problem names the file and line. ``id`` defaults to "<file stem>:<line>"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"record file {path} does not exist")
    seen = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object with keys {', '.join(keys)}")
        unknown = sorted(set(row) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(keys)}")
        missing = [k for k in required if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise ValueError(f"{where}: missing or empty {', '.join(missing)}")
        rid = str(row.get("id", f"{path.stem}:{n}"))
        if rid in seen:
            raise ValueError(f"{where}: id {rid!r} is used twice in {path.name}")
        seen.add(rid)
        yield where, row, rid


def read_records(path: Path, base: Path | None = None) -> list[Record]:
    """Records from a JSONL file; every problem names the file and line."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    records = []
    for where, row, rid in jsonl_rows(path, KEYS, REQUIRED):
        image = None
        if row.get("image"):
            p = Path(row["image"])
            image = _load_image(p if p.is_absolute() else base / p, where)
        records.append(Record(rid, row["question"], row["answer"], image, row.get("concept"), row.get("qtype", "")))
    if not records:
        raise ValueError(f"record file {path} holds no records")
    return records


def write_records(records: list[Record], path: Path, image_dir: str = "images") -> None:
    """Write records as JSONL beside their images under ``image_dir`` (PNG, one file per distinct
    image, named by a hash of its pixels, so records sharing an image share the file)."""
    import hashlib

    path = Path(path)
    images = path.parent / image_dir
    lines = []
    for r in records:
        row = {"id": r.id, "question": r.question, "answer": r.answer}
        if r.image is not None:
            images.mkdir(parents=True, exist_ok=True)
            rgb = r.image.convert("RGB")
            digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]
            name = f"{image_dir}/{digest}.png"
            if not (path.parent / name).exists():
                rgb.save(path.parent / name)
            row["image"] = name
        if r.concept:
            row["concept"] = r.concept
        if r.qtype:
            row["qtype"] = r.qtype
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")


def read_concept(data: Path) -> tuple[str, tuple[str, ...]]:
    path = Path(data) / "concept.json"
    if not path.exists():
        raise FileNotFoundError(f"{data}: no concept.json; write {{\"name\": ..., \"aliases\": [...]}} there")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    name, aliases = spec.get("name"), spec.get("aliases", [])
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}: \"name\" must be the concept's name as it appears in answers")
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"{path}: \"aliases\" must be a list of non-empty strings")
    unknown = sorted(set(spec) - {"name", "aliases"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: name, aliases")
    return name, tuple(aliases)


def load_record_data(data: Path) -> RecordData:
    """Read a data directory (layout in the module docs); checks that forget answers name the concept."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"data directory {data} does not exist")
    name, aliases = read_concept(data)
    parts = {}
    for part in FILES:
        path = data / f"{part}.jsonl"
        if part in OPTIONAL and not path.exists():
            parts[part] = []
            continue
        parts[part] = read_records(path, base=data)
    names = (name, *aliases)
    lacking = [r.id for r in parts["forget"] if not names_in(r.answer, names)]
    if lacking:
        raise ValueError(f"{data}/forget.jsonl: the answers of {lacking[:5]}{' ...' if len(lacking) > 5 else ''} "
                         f"do not name the concept ({', '.join(names)}); every forget answer must contain its "
                         f"name or an alias (add the alias to concept.json, or drop the record)")
    if not parts["efficacy"]:
        probes = [r for r in parts["forget"] if r.qtype in ("identify", "yesno")]
        parts["efficacy"] = probes or [r for r in parts["forget"] if r.image is not None] or parts["forget"]
    return RecordData(name, aliases, **parts)
