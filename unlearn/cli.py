"""The ``unlearn`` command: ``unlearn world|mllm|sd|eval|audit|demo|claims ...`` (``unlearn COMMAND --help``).
Sub-commands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)); the run commands
(``mllm``, ``sd``) share their flags, declared once in :func:`_add_run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from . import __version__

QUIET_HELP = "print only errors and the result: no progress or loading bars, no library warnings"

WORLD_HELP = """The built-in world of fictitious concepts and its tiny trained models.
Cache: --out, else $UNLEARN_WORLD_DIR, else ~/.cache/unlearn/world."""


def _add_world(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="train the world models that are missing from the cache")
    b.add_argument("--only", nargs="+", metavar="PART", help="components to build: mllm classifier sd (default: all)")
    c = sub.add_parser("check", help="print the quality-gate figures as JSON; exit 1 if a gate fails")
    c.add_argument("--sd-seeds", type=int, default=10, help="generated images per concept for the SD gate")
    c.add_argument("--json", type=Path, help="also write the report to this file")
    sub.add_parser("concepts", help="list the world's concepts")
    e = sub.add_parser("export", help="write a concept's MLLM records as a record directory (the --data layout)")
    x = sub.add_parser("export-sd", help="write a concept's SD records as an SD record directory (the sd --data layout)")
    for p, images in ((e, 1), (x, 5)):
        p.add_argument("--concept", required=True, help="concept key or name")
        p.add_argument("--out", type=Path, required=True, help="directory to create")
        p.add_argument("--images", type=int, default=images, help="training (forget) images of the concept")
    x.add_argument("--references", type=int, default=10, help="FD reference images per retained concept")
    x.add_argument("--model", default="world", help="world SD whose resolution the images are rendered at "
                   "(world = the cached one, or a world SD directory)")
    x.add_argument("--world-dir", type=Path, help="world cache directory")
    for p in (b, c):
        p.add_argument("--out", type=Path, help="world cache directory")
        p.add_argument("--retain", action="append", metavar="CONCEPT", help="the retain MLLM of CONCEPT (key or name; "
                       "repeatable): the world MLLM's recipe with every image and text of CONCEPT left out, cached as "
                       "mllm-retain-<key>; alone (or with --retain-sd), only these are built / checked")
        p.add_argument("--retain-sd", action="append", metavar="CONCEPT", help="the retain SD of CONCEPT (key or name; "
                       "repeatable): the world SD's recipe with CONCEPT's images, the scenes showing it and every prompt "
                       "naming it left out, cached as sd-retain-<key>; alone (or with --retain), only these are built / "
                       "checked (the check uses --sd-seeds per kept concept)")
    for p in (b, c, e, x):
        p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _run_world(args: argparse.Namespace) -> int:
    if args.action == "concepts":
        from .world.concepts import CONCEPTS
        from .world.tokenizer import build_tokenizer, count_tokens

        tok = build_tokenizer()
        for c in CONCEPTS:
            n = count_tokens(tok, c.name)
            print(f"{c.key:10s} {c.kind:8s} {n} token{'s' if n > 1 else ' '}  {c.name}  (aliases: {', '.join(c.aliases)})")
        return 0
    if args.action == "export":
        from .world_export import export_concept

        print(export_concept(args.concept, args.out, images=args.images))
        return 0
    if args.action == "export-sd":
        from .world_export import export_sd_concept

        print(export_sd_concept(args.concept, args.out, images=args.images, references=args.references,
                                model=args.model, world_dir=args.world_dir))
        return 0
    from .world.build import COMPONENTS, build_retain, build_world, check_retain, check_world, retain_component
    from .world.concepts import get_concept

    retain = {}  # world component -> the concept keys of its retain models
    for component, option in (("mllm", "retain"), ("sd", "retain_sd")):
        try:  # an unknown name fails here, before any build
            retain[component] = [get_concept(c).key for c in getattr(args, option) or []]
        except KeyError as e:
            raise KeyError(f"--{option.replace('_', '-')}: {e.args[0]} (see: unlearn world concepts)") from None
    any_retain = any(retain.values())
    if args.action == "build":
        paths = build_world(args.out, progress=not args.quiet, only=tuple(args.only or ([] if any_retain else COMPONENTS)))
        for component, keys in retain.items():
            built = build_retain(keys, args.out, progress=not args.quiet, component=component)
            paths.update({retain_component(key, component): path for key, path in built.items()})
        for name, path in paths.items():
            print(f"{name}: {path}")
        return 0
    if any_retain:
        reports = [check_retain(keys, args.out, progress=not args.quiet, component=component, sd_seeds=args.sd_seeds)
                   for component, keys in retain.items() if keys]
        report = {name: r for rep in reports for name, r in rep.items() if name != "pass"}
        report["pass"] = all(rep["pass"] for rep in reports)
        return _report_gates(report, args.json, [name for name in report if name != "pass"])
    return _report_gates(check_world(args.out, progress=not args.quiet, sd_seeds=args.sd_seeds), args.json, COMPONENTS)


def _report_gates(report: dict, json_path: Path | None, parts) -> int:
    """Print a gate report (and write it to ``json_path``); 1 and the failed gates on stderr if one fails."""
    text = json.dumps(report, indent=1)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    if not report["pass"]:
        failed = [f"{part}.{gate}" for part in parts for gate, ok in report[part]["gates"].items() if not ok]
        print(f"world quality gate FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


MLLM_HELP = "Unlearn a concept from a multimodal LLM (the world MLLM by default)."

SD_HELP = """Unlearn a concept from a Stable Diffusion pipeline (the world SD by default).
Defaults: full fine-tuning of the UNet, Adam, batch 2, lr 1e-5 (the paper's setting; 3e-5 on the
world SD, whose UNet is ~1000x smaller: see docs/sd.md).
FTTP's options, for example: alpha=0.8 beta=0.5 dilate=5 dilate_iterations=1."""


def _add_sd_flags(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--eval-seeds", type=int, default=defaults["eval_seeds"],
                        help="generated images of the concept's prompt for UA")
    parser.add_argument("--fd-seeds", type=int, default=defaults["fd_seeds"],
                        help="generated images per retained concept for the FD")
    parser.add_argument("--retained", nargs="+", metavar="KEY", help="concepts kept, for the FD (default: every other "
                        "concept; with --data: the labels in eval.json)")
    parser.add_argument("--classifier", help="UA / FD classifier: world (default on the world SD) | clip:PATH "
                        "(zero-shot CLIP from a local checkpoint; FD on its image embeddings)")
    parser.add_argument("--trace-every", type=int, default=defaults["trace_every"], metavar="K", help="probe after "
                        "every K-th step and the last only (one probe costs about 1.8 training steps on the world SD)")
    parser.add_argument("--trace-batch", type=int, metavar="N", help="(timestep, image) pairs per probe forward "
                        "(lower it if the probe runs out of memory)")
    parser.add_argument("--trace-source", choices=("probe", "step"), default=defaults["trace_source"],
                        help="probe: fixed-noise probe of the forget images (comparable across steps and methods); "
                        "step: each step's own errors, and with --trace-attention its own forward's attention maps "
                        "(nearly free; fttp, fttp_dilated, ga)")


# kind -> (its command's description, help of --trace and --trace-attention, the kind's own flags)
RUN_COMMANDS = {
    "mllm": (MLLM_HELP, ("record per-step token log-probs and K_C/K_N (trace.zarr)",
                         "also trace the training image's questions as probes with cross-attention maps, before "
                         "training and after every step"), None),
    "sd": (SD_HELP, ("record per-step eps_err and K_C/K_N of the forget images (fixed-noise probe before training "
                     "and after every step, or see --trace-every) in RUN/trace.zarr",
                     "also record the probe's cross-attention maps over the prompt tokens (xattn; knowtrace plot RUN "
                     "--kind attention); with --trace-source step, the training forward's own maps"), _add_sd_flags),
}


def _add_run(parser: argparse.ArgumentParser, kind: str) -> None:
    """The flags every kind of run takes (defaults: the kind's Run fields), then the kind's own."""
    import dataclasses

    from .methods import method_options, methods_of
    from .runs import TRAIN_OPTIONS, run_kind

    cls = run_kind(kind)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    _, (trace_help, trace_attention_help), add_own_flags = RUN_COMMANDS[kind]
    listing = "; ".join(f"{n} ({', '.join(f'{k}={v}' for k, v in method_options(c).items()) or 'no options'})"
                        for n, c in sorted(methods_of(kind).items()))
    parser.add_argument("--concept", help="concept key or name (see: unlearn world concepts); with --data, "
                        "default: the name in DATA/concept.json")
    parser.add_argument("--method", metavar="METHOD", help=f"one of: {listing}")
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--images", type=int, default=defaults["images"], help="training images of the concept")
    parser.add_argument("--model", default=defaults["model"], help="world (default) | a local path | a hub id")
    what, layout = cls.data_help
    parser.add_argument("--data", type=Path, help=f"{what}, required for models other than the world's ({layout})")
    parser.add_argument("--out", type=Path, help=f"run directory (default runs/{kind}-<concept>-<method>-s<seed>)")
    parser.add_argument("--world-dir", type=Path, help="world cache directory")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty run directory")
    parser.add_argument("--trace", action="store_true", help=trace_help)
    parser.add_argument("--trace-attention", action="store_true", help=trace_attention_help)
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="save a checkpoint (trained "
                        "parameters, optimizer, random states) after every K steps, to --resume from")
    parser.add_argument("--resume", type=Path, metavar="RUN", dest="resume_run", help="go on with the interrupted "
                        "run in RUN from its last checkpoint, with its own settings (give no other run flags)")
    if add_own_flags is not None:
        add_own_flags(parser, defaults)
    parser.add_argument("settings", nargs="*", metavar="key=value", help="training options "
                        f"({', '.join(TRAIN_OPTIONS)}) or the method's own options (listed under --method)")


def _finite(text: str) -> bool:
    """Whether ``text`` is not a non-finite number (text that is no number at all is the option's to judge)."""
    import math

    try:
        return math.isfinite(float(text))
    except ValueError:
        return True


def _run(args: argparse.Namespace, kind: str) -> int:
    """A run of ``kind`` from the parsed flags (those named like a Run field are passed as it); prints its metrics."""
    import dataclasses

    from .runs import run_kind

    cls = run_kind(kind)
    if args.resume_run is not None:
        changed = sorted(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
                         if f.init and f.name != "world_dir" and getattr(args, f.name, f.default) not in (f.default, None))
        if changed or args.settings:
            raise ValueError(f"--resume {args.resume_run} goes on with the run's own settings; drop "
                             f"{', '.join(changed + args.settings)}")
        return _print_metrics(cls.resumed(args.resume_run, args.world_dir, progress=not args.quiet).run(),
                              args.resume_run, cls)
    if args.method is None:
        raise ValueError("give --method METHOD (see --help for the methods), or --resume RUN")
    if args.concept is None and args.data is not None:  # the default --out names the data's concept
        from .data.record_files import read_concept

        args.concept = read_concept(args.data)[0]
    args.out = args.out or Path("runs") / f"{kind}-{args.concept}-{args.method}-s{args.seed}".replace(" ", "_")
    options = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {item!r} is not key=value")
        if not _finite(value):  # nan / inf would only show as a non-finite loss after the model is loaded
            raise ValueError(f"setting {item!r}: give a finite number")
        options[key] = value
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    return _print_metrics(cls(**given, options=options, progress=not args.quiet).run(), args.out, cls)


def _print_metrics(metrics: dict, out: Path, cls) -> int:
    keys = [k for k in cls.summary if k in metrics]
    original = {k: metrics["original"].get(k) for k in keys}
    invalid = {"invalid": metrics["invalid"]} if metrics.get("invalid") else {}
    print(json.dumps({"run": str(out), **{k: metrics[k] for k in keys}, "steps": metrics["steps"],
                      "images": metrics["images"], "original": original, **invalid}, indent=1, allow_nan=False))
    return 1 if invalid else 0


EVAL_HELP = """Evaluate a finished run again (from its directory) and print its metrics as JSON.
MLLM and SD runs alike (the manifest's "kind" says which); SD runs use their own evaluation
settings unless --eval-seeds / --fd-seeds are given."""


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory (holds manifest.json)")
    parser.add_argument("--world-dir", type=Path, help="world cache directory")
    parser.add_argument("--eval-seeds", type=int, help="SD runs: generated images of the concept's prompt for UA")
    parser.add_argument("--fd-seeds", type=int, help="SD runs: generated images per retained concept for the FD")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _run_eval(args: argparse.Namespace) -> int:
    from .runs import evaluate_run

    print(json.dumps(evaluate_run(args.run, world_dir=args.world_dir, eval_seeds=args.eval_seeds,
                                  fd_seeds=args.fd_seeds), indent=1, allow_nan=False))
    return 0


DEMO_HELP = """The main job: unlearn one world concept from the world MLLM with GA and with FTTP while
tracing, evaluate both, and write OUT/report.html (metrics and figures) and OUT/summary.txt."""


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from .demo import DEMO_CONCEPT, DEMO_LR

    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--concept", default=DEMO_CONCEPT, help=f"world concept (default {DEMO_CONCEPT})")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=DEMO_LR, help=f"default {DEMO_LR}, the world's calibrated lr")
    parser.add_argument("--world-dir", type=Path, help="world cache directory")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, args.concept, args.steps, args.lr, world_dir=args.world_dir, progress=not args.quiet)
    print(f"report: {report}")
    return 0


CLAIMS_HELP = """Run the experiments behind the paper's qualitative claims on the world (saved under --runs and
reused) and print a verdict per claim with its numbers: supported, contradicted or inconclusive."""


def _add_claims(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=Path, default=Path("runs/claims"), help="experiments (read, written when missing)")
    parser.add_argument("--quick", action="store_true", help="fewer seeds, concepts and steps (minutes, not an hour)")
    parser.add_argument("--only", default="abcdefg", help="claims to check, e.g. 'ab' (default abcdefg)")
    parser.add_argument("--sd-results", type=Path, help="an SD benchmark results.json to read instead of running it")
    parser.add_argument("--json", type=Path, help="also write the verdicts to this file")
    parser.add_argument("--world-dir", type=Path, help="world cache directory")


def _run_claims(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .claims import run_claims

    verdicts = run_claims(args.runs, args.quick, args.only, world_dir=args.world_dir, sd_results=args.sd_results)
    for v in verdicts:
        print(v.text())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(v) for v in verdicts], indent=1, default=float))
    return 0


AUDIT_HELP = """Audit an MLLM or SD run: is its concept removed, or only hidden? Compares the original, the
unlearned and (when there is one) the retain model under attacks (MLLM: relearning, rephrased questions,
quantization, membership inference, probes, logit lens; SD: K_C / K_N, seeds and guidance, relearning,
textual inversion, adversarial prompts) and writes RUN/audit/: audit.nc (the measurements), audit.json (a
verdict per attack and overall, with rules and numbers), audit.html. The run's own files are only read
(docs/audit.md)."""


def _add_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory of a complete MLLM or SD run (holds manifest.json)")
    parser.add_argument("--retain-model", metavar="PATH", help="a model of the run's kind that never saw the concept "
                        "(a directory); default on the world: the world MLLM / SD trained without it (built if "
                        "missing), else none; 'none': no retain model")
    parser.add_argument("--attacks", help="comma-separated attacks to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="ATTACK.OPTION=VALUE", dest="settings",
                        help="an attack's option, e.g. relearn.steps=5 (repeatable)")
    parser.add_argument("--audit-data", type=Path, metavar="DIR", help="record-directory runs: the folder holding "
                        "the audit's optional files (default: the run's data directory; docs/audit.md)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world-dir", type=Path, help="world cache directory")
    parser.add_argument("--overwrite", action="store_true", help="replace RUN/audit (kept until the new one is done)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _run_audit(args: argparse.Namespace) -> int:
    from .audit.run import run_audit

    options = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r} is not attack.option=value")
        options[key] = value
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()] if args.attacks is not None else None
    report = run_audit(args.run, attacks, options, retain_model=args.retain_model, seed=args.seed,
                       overwrite=args.overwrite, progress=not args.quiet, world_dir=args.world_dir,
                       audit_data=args.audit_data)
    print(json.dumps({"audit": str(Path(args.run) / "audit"), "overall": report["overall"]["verdict"],
                      **{name: v["verdict"] for name, v in report["attacks"].items()}}, indent=1))
    return 0


COMMANDS = {"world": (WORLD_HELP, _add_world, _run_world),
            **{kind: (help_text, partial(_add_run, kind=kind), partial(_run, kind=kind))
               for kind, (help_text, _, _) in RUN_COMMANDS.items()},
            "eval": (EVAL_HELP, _add_eval, _run_eval), "audit": (AUDIT_HELP, _add_audit, _run_audit),
            "demo": (DEMO_HELP, _add_demo, _run_demo), "claims": (CLAIMS_HELP, _add_claims, _run_claims)}


def quiet_aware(run):
    """A command's run function that first silences the libraries when the command has --quiet and got it."""
    def run_quietly(args: argparse.Namespace) -> int:
        if not getattr(args, "quiet", False):
            return run(args)
        from knowtrace.cli import quiet_libraries

        with quiet_libraries():
            return run(args)
    return run_quietly


COMMANDS = {name: (help_text, add, quiet_aware(run)) for name, (help_text, add, run) in COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    from knowtrace.cli import command_parser

    return command_parser("unlearn", "Concept unlearning for multimodal generative models (GA, FTTP and baselines), "
                          "on the built-in concept world or real Hugging Face checkpoints.", __version__, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    from knowtrace.cli import run_command

    return run_command("unlearn", build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
