"""``unlearn audit RUN``: is the concept a run unlearned removed, or only hidden? For MLLM and SD runs alike;
what differs per kind (attacks, data, how models load) is :mod:`unlearn.audit.kinds`'.

Checks first (nothing is written before they pass): RUN is a complete MLLM or SD run with intact trained
files and a model that can be found, the attacks and their options exist, a --retain-model is a model
directory, RUN/audit is absent unless ``overwrite``. Then the context (:class:`.base.AuditContext`): the
models (original: the run's starting model; unlearned: the run reloaded, LoRA merged; retain: the given
directory, on the world the world model trained without the concept, else none), the data, the run's
training settings; each attack runs and reads its dataset into a verdict; the datasets, namespaced by
attack, merge into ``audit.nc``; ``audit.json`` holds the verdicts and the overall one; ``audit.html``
shows them. Everything is written into ``RUN/.audit.partial`` and renamed to ``RUN/audit`` at the end:
an interrupted audit leaves the run, and any earlier audit, as they were. The run's own files are only read.
"""

from __future__ import annotations

import importlib
import math
import shutil
import sys
import time
from pathlib import Path

import xarray as xr

from .base import ATTACKS, MODELS, AuditContext, Verdict
from .kinds import KINDS

AUDIT_DIR, PARTIAL, OLD = "audit", ".audit.partial", ".audit.old"
NO_RETAIN = "none"  # --retain-model none: audit without a retain model


def attacks(kind: str = "mllm") -> dict:
    """name -> Attack class of the audit of ``kind`` runs, its attack modules imported, in their order (the
    order they run in, whatever order they were first imported in)."""
    modules = KINDS[kind].attack_modules
    for module in modules:
        importlib.import_module(f"{__package__}.{module}")
    rank = {f"{__package__}.{m}": i for i, m in enumerate(modules)}
    return dict(sorted(ATTACKS.get(kind, {}).items(), key=lambda item: rank.get(item[1].__module__, len(rank))))


def overall_verdict(verdicts: list[Verdict]) -> dict:
    """The audit's conclusion from its attacks' verdicts."""
    count = {v: sum(x.verdict == v for x in verdicts) for v in ("removed", "hidden", "inconclusive")}
    rule = ("hidden if any attack finds the concept hidden (one way to bring it back is enough); removed if none "
            "does and a majority of the attacks find it removed; else inconclusive")
    if count["hidden"]:
        verdict = "hidden"
    elif count["removed"] * 2 > len(verdicts):
        verdict = "removed"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "rule": rule, "numbers": {**count, "hidden_by": [v.attack for v in verdicts
                                                                                 if v.verdict == "hidden"]}}


def check_audit(run: Path, names: list[str] | None, options: dict, retain_model, overwrite: bool,
                audit_data: Path | None) -> tuple[dict, list[str]]:
    """Every check that needs no model; returns (the run's manifest, the attacks to run)."""
    from ..models.source import checked_source
    from ..runs import MANIFEST_KEYS, check_trained_files, describe_state, read_manifest, run_kind, run_state

    run = Path(run)
    manifest = read_manifest(run)
    kind = manifest.get("kind", "mllm")
    if kind not in KINDS:
        raise ValueError(f"{run} is a run of kind {kind!r}: the audit is for {' and '.join(KINDS)} runs")
    audit_kind = KINDS[kind]
    lacking = [k for k in MANIFEST_KEYS if k not in manifest]
    if lacking:
        raise ValueError(f"run manifest {run / 'manifest.json'} lacks {', '.join(lacking)}: it is damaged")
    if run_state(run, manifest) != "complete":
        raise ValueError(describe_state(run, manifest))
    check_trained_files(run)
    if not run_kind(kind).on_world(manifest["model"]):
        checked_source(manifest["model"], audit_kind.model_file(), what="the run's model")
    if retain_model not in (None, NO_RETAIN):
        if not Path(retain_model).is_dir():
            raise FileNotFoundError(f"--retain-model {retain_model}: no such directory; give the directory of a model "
                                    f"that never saw the concept (save_pretrained's), or 'none'")
        checked_source(retain_model, audit_kind.model_file(), what="--retain-model")
    if audit_data is not None and manifest.get("data", "world") == "world":
        raise ValueError(f"--audit-data is for runs on a record directory; {run} ran on the world, whose audit data "
                         f"is the world's")
    if audit_data is not None and not Path(audit_data).is_dir():
        raise FileNotFoundError(f"--audit-data {audit_data}: no such directory")
    registry = attacks(kind)
    chosen = list(names or registry)
    unknown = [a for a in chosen if a not in registry]
    if unknown:
        raise KeyError(f"unknown audit attack(s) {', '.join(unknown)} for {kind} runs; attacks: {', '.join(registry)}")
    for key in options:
        attack, _, option = key.partition(".")
        valid = registry[attack].options if attack in registry else None
        if valid is None or option not in valid or attack not in chosen:
            listing = "; ".join(f"{a}: {', '.join(f'{o}={d}' for o, d in registry[a].options.items()) or 'none'}"
                                for a in chosen)
            raise KeyError(f"unknown audit option {key!r}; give attack.option=value, options of the chosen attacks: "
                           f"{listing}")
    typed = AuditContext(run, manifest, None, {}, None, options)  # reads every option as its attack will
    for name in chosen:
        values = {o: typed.option(name, o, d) for o, d in registry[name].options.items()}
        registry[name].check_options(values)  # an attack's own limits (e.g. relearn.steps >= 1)
    if (run / AUDIT_DIR).exists() and not overwrite:
        raise FileExistsError(f"{run / AUDIT_DIR} exists; pass --overwrite to replace it (it stays as it is until the "
                              f"new audit is complete)")
    return manifest, chosen


def namespaced(name: str, ds: xr.Dataset, models: tuple[str, ...]) -> xr.Dataset:
    """An attack's dataset with its dimensions, coordinates and attributes prefixed by the attack's name
    (``model`` stays shared, in MODELS order) and its variables too unless they already are."""
    prefix = f"{name}_"
    ds = ds.rename({d: prefix + d for d in ds.dims if d != "model" and not d.startswith(prefix)})
    ds = ds.rename({c: prefix + c for c in ds.coords if c not in ds.dims and not c.startswith(prefix)})
    ds = ds.rename({v: prefix + v for v in ds.data_vars if not v.startswith(prefix)})
    ds.attrs = {prefix + k: v for k, v in ds.attrs.items()}
    if "model" in ds.dims:
        ds = ds.reindex(model=[m for m in MODELS if m in models])
    return ds


def merge_datasets(parts: dict[str, xr.Dataset], models: tuple[str, ...]) -> xr.Dataset:
    merged = xr.merge([namespaced(n, ds, models) for n, ds in parts.items()], combine_attrs="drop_conflicts",
                      join="outer", compat="no_conflicts")
    return merged


def json_numbers(value):
    """NaN / inf (not measured) as None, numpy scalars as Python ones: audit.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_numbers(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def run_audit(run: Path, attack_names: list[str] | None = None, options: dict | None = None, retain_model=None,
              seed: int = 0, overwrite: bool = False, progress: bool = True, world_dir=None, world_config=None,
              audit_data: Path | None = None) -> dict:
    """Audit run directory ``run`` into ``run/audit`` (see the module docs); returns what audit.json holds.
    ``options``: "attack.option" -> value (text or typed); ``retain_model``: a model directory, "none", or
    None for the default (the world's retain model on the world, else none)."""
    from tqdm.auto import tqdm

    from ..loop import TrainConfig, seed_everything
    from ..runs import git_commit, run_dir_lock, versions, write_json
    from .report import write_audit_report

    run, options = Path(run), dict(options or {})
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed}: give an integer 0 .. 2**32-1")
    manifest, chosen = check_audit(run, attack_names, options, retain_model, overwrite, audit_data)
    kind = KINDS[manifest.get("kind", "mllm")]
    registry, start = attacks(kind.kind), time.perf_counter()
    with run_dir_lock(run):  # no run or other audit writes this directory meanwhile
        cls = kind.run_class()
        again = cls.from_manifest(run, manifest, world_dir, world_config=world_config, progress=False)
        again.adapter = cls.load_model(manifest["model"], world_dir, world_config)
        again.load_data()
        data = kind.data(again, audit_data)
        loaders = kind.loaders(run, manifest, data, retain_model, world_dir, world_config, progress)
        ctx = AuditContext(run, manifest, data, loaders, TrainConfig(**manifest["train"]), options, seed, progress)
        ctx._adapters["original"] = again.adapter  # loaded once: the data needed it
        timings = {"load": time.perf_counter() - start}
        partial, final = run / PARTIAL, run / AUDIT_DIR
        shutil.rmtree(partial, ignore_errors=True)  # left by an audit that was killed
        partial.mkdir()
        try:
            results, verdicts, resolved = {}, [], {}
            for name in tqdm(chosen, desc="audit", disable=not progress):
                attack, t = registry[name](), time.perf_counter()
                resolved[name] = {o: ctx.option(name, o, d) for o, d in attack.options.items()}
                missing = [f for f in attack.needs_data if not getattr(data, f)]
                if missing:
                    where = "the world's audit data" if again.data is None else str(audit_data or again.data)
                    verdicts.append(Verdict(name, "inconclusive", "skipped: its data is absent",
                                            {"missing": [kind.data_files.get(f, f) for f in missing], "in": where}))
                else:  # without a retain model an attack still measures; its verdict then says inconclusive
                    seed_everything(seed)
                    results[name] = attack.run(ctx)
                    verdicts.append(attack.verdict(results[name], ctx))
                timings[name] = time.perf_counter() - t
            ds = merge_datasets(results, ctx.models)
            ds.attrs.update(concept=data.concept, method=manifest["method"], seed=seed, models=" ".join(ctx.models),
                            **{f"verdict_{v.attack}": v.verdict for v in verdicts})
            overall = overall_verdict(verdicts)
            ds.attrs["verdict"] = overall["verdict"]
            timings["total"] = time.perf_counter() - start
            report = json_numbers({
                "run": str(run), "concept": data.concept, "names": list(data.names), "method": manifest["method"],
                "kind": kind.kind,
                "records": {f: len(getattr(data, f)) for f in ("forget", "test", *kind.data_files)
                            if hasattr(data, f)},  # what was asked
                "models": list(ctx.models), "retain_model": None if "retain" not in ctx.models else str(
                    retain_model if retain_model not in (None, NO_RETAIN) else "world"),
                "attacks": {v.attack: {"verdict": v.verdict, "rule": v.rule, "numbers": v.numbers,
                                       "options": resolved[v.attack], "seconds": round(timings[v.attack], 3)}
                            for v in verdicts},
                "overall": overall, "options": options, "seed": seed, "versions": versions(),
                "git_commit": git_commit(), "timings_seconds": {k: round(v, 3) for k, v in timings.items()}})
            ds.to_netcdf(partial / "audit.nc", engine="h5netcdf")
            write_json(partial / "audit.json", report)
            write_audit_report(ds, report, partial / "audit.html")
            if final.exists():  # --overwrite: the old audit goes only once the new one is complete
                shutil.rmtree(run / OLD, ignore_errors=True)
                final.rename(run / OLD)
            partial.rename(final)
            shutil.rmtree(run / OLD, ignore_errors=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return report
