"""The audit's data (:class:`.base.AuditData`) of an MLLM run: on the world, the world's
(``unlearn.audit.world_data.world_audit_data``); for a record directory, the run's forget and test records
plus optional record files (the layout of :mod:`unlearn.data.record_files`), in the run's data directory or
a directory given with ``--audit-data``:

    unseen.jsonl       the concept on images the run never used (relearning set (b); the probes' test images)
    unrelated.jsonl    other concepts' records (benign relearning, set (c))
    rephrased.jsonl    the concept's questions in phrasings the unlearning never saw
    members.jsonl      records of the concept the original model was trained on (membership inference)
    nonmembers.jsonl   records of the same kind it never saw
    probe.jsonl        images of several concepts for the linear probes, each record's "concept" its label

A file that is absent leaves its list empty: the attacks that need it are skipped ("inconclusive", naming
the file).
"""

from __future__ import annotations

from pathlib import Path

from ..data.record_files import read_records
from .base import AuditData

# AuditData field -> the record file it is read from
FILES = {"unseen": "unseen.jsonl", "unrelated": "unrelated.jsonl", "rephrased": "rephrased.jsonl",
         "members": "members.jsonl", "nonmembers": "nonmembers.jsonl", "probe_train": "probe.jsonl"}


def record_audit_data(name: str, names: tuple[str, ...], forget: list, test: list, where: Path) -> AuditData:
    """The audit data of a record-directory run: ``forget`` and ``test`` as the run used them, the rest read
    from the optional files in ``where``."""
    where = Path(where)
    if not where.is_dir():
        raise FileNotFoundError(f"audit data directory {where} does not exist; give the folder holding the audit's "
                                f"record files ({', '.join(FILES.values())})")
    lists = {field: read_records(where / file) if (where / file).exists() else [] for field, file in FILES.items()}
    labels, label = probe_labels(lists["probe_train"], names, where / FILES["probe_train"])
    probe_test = [r for r in lists["unseen"] if r.image is not None]
    return AuditData(name, tuple(names), forget, test, lists["unseen"], lists["unrelated"], lists["rephrased"],
                     lists["members"], lists["nonmembers"], lists["probe_train"], labels, probe_test, label)


def probe_labels(records: list, names, path: Path) -> tuple[list[int], int]:
    """(each probe record's label: the index of its "concept" in order of first appearance, the label of
    the run's concept); (-1 when there are no probe records)."""
    if not records:
        return [], -1
    unlabelled = [r.id for r in records if not r.concept]
    if unlabelled:
        raise ValueError(f"{path}: records {unlabelled[:5]} have no \"concept\": every probe record names the concept "
                         f"its image shows (its label)")
    order = list(dict.fromkeys(r.concept for r in records))
    own = [i for i, c in enumerate(order) if c.lower() in {n.lower() for n in names}]
    if not own:
        raise ValueError(f"{path}: no record is labelled with the run's concept ({', '.join(names)}); the probes "
                         f"decode which concept an image shows, so some records must show it")
    return [order.index(r.concept) for r in records], own[0]


def run_audit_data(run, audit_dir: Path | None = None) -> AuditData:
    """The audit data of ``run`` (an :class:`unlearn.run_mllm.MLLMRun` whose data is loaded): the world's,
    else its record directory's (the optional files from ``audit_dir``, default the run's data directory)."""
    if run.data is None:
        from .world_data import world_audit_data

        mllm_config = getattr(run.world_config, "mllm", None)
        return world_audit_data(run.key, run.forget, run.evalset.test, run.adapter.crop_side,
                                mllm_config=mllm_config)
    return record_audit_data(run.key, run.names, run.forget, run.evalset.test, audit_dir or run.data)
