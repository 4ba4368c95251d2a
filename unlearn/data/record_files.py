"""Record files: the forget / retain / evaluation data of a run on any model, as a directory.

    DATA/
      concept.json        {"name": "Donald Trump", "aliases": ["Trump", "President Trump"]}
                          optional "allow_outside_paths": true: records may name files outside DATA
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
    image     path relative to DATA; omit for a text-only record. A path that leaves DATA (``..``, or an
              absolute path elsewhere) is refused unless concept.json says "allow_outside_paths": true
              (checked on the path as written: a symbolic link inside DATA is followed). Images of
              every mode are read as 8-bit RGB (:func:`knowtrace.files.read_image`: 16-bit scaled,
              transparency on white)
    concept   optional, the concept the answer is about
    qtype     optional: "yesno" for a yes/no question about the concept's presence (an answer
              starting with "no" counts as forgotten), "identify", or any label

``unlearn world export`` writes a world concept in this layout, which is also a worked example.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from knowtrace.files import read_image, read_json, read_text

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


class Concept(NamedTuple):
    """concept.json: the concept's name and aliases; whether records may name files outside the directory."""
    name: str
    aliases: tuple[str, ...]
    allow_outside_paths: bool = False


def record_path(value, base: Path, what: str, allow_outside: bool = False) -> Path:
    """The file a record names (``what``: "<file>:<line>: image"), relative to ``base``, the record
    directory; a path that leaves it (``..``, an absolute path elsewhere) is an error unless ``allow_outside``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a file path (text), got {value!r}")
    path = Path(os.path.normpath(base.absolute() / value))  # as written: "a/../b" -> "b"; links are not followed
    if not allow_outside and not path.is_relative_to(os.path.normpath(base.absolute())):
        raise ValueError(f"{what} {value!r} is outside the record directory {base}; put the file inside it (a path "
                         f"relative to it), or allow paths outside it with \"allow_outside_paths\": true in "
                         f"{base / 'concept.json'}")
    return path


def jsonl_rows(path: Path, keys: tuple[str, ...], required: tuple[str, ...]):
    """Yield ``(where, row, id)`` for each non-empty line of a JSONL record file, after the checks
    every record file shares (valid JSON object, known keys, required text fields, unique ids); each
    problem names the file and line. ``id`` defaults to "<file stem>:<line>"."""
    path = Path(path)
    seen = set()
    for n, line in enumerate(read_text(path, "record file").splitlines(), 1):
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


def read_records(path: Path, base: Path | None = None, allow_outside: bool = False) -> list[Record]:
    """Records from a JSONL file; every problem names the file and line. Image paths are relative to
    ``base`` (default: the file's folder) and stay inside it unless ``allow_outside``."""
    path = Path(path)
    base = Path(base) if base is not None else path.parent
    records = []
    for where, row, rid in jsonl_rows(path, KEYS, REQUIRED):
        image = None
        if row.get("image"):
            what = f"{where}: image"
            image = read_image(record_path(row["image"], base, what, allow_outside), what)
        bad = [k for k in ("concept", "qtype") if not isinstance(row.get(k, ""), str)]
        if bad:
            raise ValueError(f"{where}: {', '.join(bad)} must be text")
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


def read_concept(data: Path) -> Concept:
    path = record_directory(data) / "concept.json"
    if not path.exists():
        raise FileNotFoundError(f"{data}: no concept.json; write {{\"name\": ..., \"aliases\": [...]}} there")
    spec = read_json(path, "concept file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: must be a JSON object {{\"name\": ..., \"aliases\": [...]}}")
    name, aliases, outside = spec.get("name"), spec.get("aliases", []), spec.get("allow_outside_paths", False)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}: \"name\" must be the concept's name as it appears in answers")
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ValueError(f"{path}: \"aliases\" must be a list of non-empty strings")
    if not isinstance(outside, bool):
        raise ValueError(f"{path}: \"allow_outside_paths\" must be true or false")
    unknown = sorted(set(spec) - set(Concept._fields))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(Concept._fields)}")
    return Concept(name, tuple(aliases), outside)


def record_directory(data: Path) -> Path:
    """``data`` if it is a folder; else an error saying what it is."""
    data = Path(data)
    if not data.is_dir():
        what = "is a file, not a folder" if data.exists() else "does not exist"
        raise FileNotFoundError(f"data directory {data} {what}; give the folder holding concept.json and the record "
                                f"files")
    return data


def load_record_data(data: Path) -> RecordData:
    """Read a data directory (layout in the module docs); checks that forget answers name the concept."""
    data = record_directory(data)
    name, aliases, outside = read_concept(data)
    parts = {}
    for part in FILES:
        path = data / f"{part}.jsonl"
        if part in OPTIONAL and not path.exists():
            parts[part] = []
            continue
        parts[part] = read_records(path, base=data, allow_outside=outside)
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
