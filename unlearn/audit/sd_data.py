"""The audit's data (:class:`.base.SDAuditData`) of a Stable Diffusion run.

On the world: the run's forget images and UA prompts; ``unseen``: the concept's renders from the
``audit`` split (no world model trains or evaluates on it), with exact masks and the concept's canonical
prompt; ``retained``: every other concept's prompt; ``scenes``: the concept beside each other object
concept, in both orders (none for an art style); the world classifier.

For a record directory (the layout of :mod:`unlearn.data.sd_record_files`), the run's forget records, UA
prompts and retained concepts, its classifier, plus optional files in the run's data directory or a
directory given with ``--audit-data``:

    unseen.jsonl    SD records of the concept on images the run never used (relearning, textual inversion);
                    the layout of forget.jsonl (each prompt names the concept)
    scenes.txt      prompts that place the concept among other things, one per line, each naming it

A file that is absent leaves its list empty: the attacks that need it are skipped ("inconclusive", naming
the file).
"""

from __future__ import annotations

from pathlib import Path

from ..data.sd_records import SDRecord
from .base import SDAuditData

FILES = {"unseen": "unseen.jsonl", "scenes": "scenes.txt"}  # SDAuditData field -> the optional file
SPLIT = "audit"


def world_sd_audit_data(concept_key: str, forget: list[SDRecord], prompts: list[str], retained: dict[str, str],
                        classifier, size: int, world_seed: int = 0, n: int = 20) -> SDAuditData:
    """The audit data of world concept ``concept_key``: ``forget``, ``prompts``, ``retained`` and
    ``classifier`` as the run used them; ``n`` unseen renders at the model's resolution ``size``."""
    from ..world.concepts import CONCEPTS, get_concept
    from ..world.render import world_image
    from ..world.sd import concept_prompt, scene_prompt

    if n < 1:
        raise ValueError(f"n={n}: the audit needs at least one unseen image of the concept")
    concept = get_concept(concept_key)
    renders = [world_image(concept.key, SPLIT, i, size, world_seed) for i in range(n)]
    unseen = [SDRecord(f"{concept.key}:{SPLIT}:{i}", concept_prompt(concept), r.image, concept.key,
                       r.masks[concept.key]) for i, r in enumerate(renders)]
    others = [c for c in CONCEPTS if c.kind != "style" and c.key != concept.key]
    scenes = [] if concept.kind == "style" else \
        [p for o in others for p in (scene_prompt(concept, o), scene_prompt(o, concept))]
    return SDAuditData(concept.key, tuple(concept.names), concept.key, list(prompts), list(forget), unseen,
                       dict(retained), scenes, classifier)


def record_sd_audit_data(name: str, names: tuple[str, ...], label: str, prompts: list[str], forget: list[SDRecord],
                         retained: dict[str, str], classifier, where: Path) -> SDAuditData:
    """The audit data of a record-directory SD run: the optional files read from ``where``."""
    from ..data.names import names_in
    from ..data.sd_record_files import read_sd_records

    where = Path(where)
    if not where.is_dir():
        raise FileNotFoundError(f"audit data directory {where} does not exist; give the folder holding the audit's "
                                f"files ({', '.join(FILES.values())})")
    unseen_file, scenes_file = where / FILES["unseen"], where / FILES["scenes"]
    # K_C of the unseen images (the knowledge attack) is read on the concept's pixels: each needs its mask
    unseen = read_sd_records(unseen_file, names=names, base=where, need_masks=True,
                             mask_reason="an unseen image needs its concept mask (the audit reads K_C on the "
                                         "concept's pixels)") if unseen_file.exists() else []
    scenes = []
    if scenes_file.exists():
        for i, line in enumerate(scenes_file.read_text().splitlines(), 1):
            if line.strip() and not names_in(line, names):
                raise ValueError(f"{scenes_file}:{i}: the scene prompt {line.strip()!r} names none of "
                                 f"{', '.join(names)}; every scene prompt asks for the concept")
            if line.strip():
                scenes.append(line.strip())
    return SDAuditData(name, tuple(names), label, list(prompts), list(forget), unseen, dict(retained), scenes,
                       classifier)


def run_sd_audit_data(run, audit_dir: Path | None = None) -> SDAuditData:
    """The audit data of ``run`` (an :class:`unlearn.run_sd.SDRun` whose data is loaded)."""
    target = run.target
    if run.data is None:
        sd_config = getattr(run.world_config, "sd", None)  # the world the run's model was built from
        return world_sd_audit_data(target.key, run.forget, target.prompts, target.retained, run.ua_classifier,
                                   run.adapter.resolution, world_seed=getattr(sd_config, "world_seed", 0))
    return record_sd_audit_data(target.key, tuple(target.names), target.label, target.prompts, run.forget,
                                target.retained, run.ua_classifier, audit_dir or run.data)
