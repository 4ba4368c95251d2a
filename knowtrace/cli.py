"""The ``knowtrace`` command: look at a recorded trace.

    knowtrace summary RUN [--json]
    knowtrace plot RUN --kind tokens|knowledge|attention|eps_err [--sample N] [--html FILE] [--png FILE]
    knowtrace plot RUN [RUN ...] --kind scatter [--mode final|trajectory] [--html FILE] [--png FILE]
    knowtrace export RUN --netcdf FILE

``RUN`` is a run directory (holding ``trace.zarr``, as ``unlearn mllm --trace`` writes it), a trace
(Zarr store) or an exported ``.nc`` file. Traces are opened lazily (dask): only what a command shows
is read, and ``export`` streams chunk by chunk, so traces bigger than memory are fine.
Sub-commands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import numpy as np
import xarray as xr

from . import plots
from .schema import JSON_ATTRS, PROBE_GROUP, SAMPLE, STEP
from .files import read_image
from .run_lock import live_state
from .store import export_netcdf, is_decoding_error, netcdf_groups, open_trace

TRACE_NAME = "trace.zarr"
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf")
# looked up in RUN/samples/ for attention underlays: by sample index, then by sample id
IMAGE_NAMES = ("sample-{n}.png", "{n}.png")


def resolve(run: Path) -> tuple[Path, Path | None]:
    """(trace path, run directory or None) for RUN = a run directory, a Zarr trace or a .nc file."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist")
    if run.is_dir() and (run / TRACE_NAME).is_dir():
        return run / TRACE_NAME, run
    is_zarr = run.is_dir() and ((run / "zarr.json").exists() or (run / ".zgroup").exists())
    if is_zarr or (run.is_file() and run.suffix.lower() in NETCDF_SUFFIXES):
        if not is_zarr:
            _check_netcdf(run)
        return run, run.parent if (run.parent / "manifest.json").exists() else None
    raise FileNotFoundError(f"{run} is neither a run directory with {TRACE_NAME} nor a trace (Zarr store or .nc "
                            f"file); record one with `unlearn mllm ... --trace` or knowtrace's MLLMTracer")


def _check_netcdf(path: Path) -> None:
    try:
        netcdf_groups(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a NetCDF trace ({e}); it is empty or damaged: export it again "
                         f"with knowtrace export RUN --netcdf FILE") from None


def damaged_trace_errors(run_command):
    """A command's run function whose damaged trace chunks (they fail when read, lazily) are an error
    naming the trace, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return run_command(args)
        except Exception as e:
            if not is_decoding_error(e):
                raise
            runs = getattr(args, "runs", None) or [args.run]
            raise ValueError(f"trace {', '.join(map(str, runs))} is damaged: a stored chunk cannot be decoded "
                             f"({type(e).__name__}: {e}); record it again, or restore it from a copy") from e
    return run


def load(run: Path, probe: bool = False) -> tuple[xr.Dataset, Path, Path | None]:
    """The trace of RUN (or its probe group), lazily, JSON attrs decoded; plus its path and run directory."""
    trace, run_dir = resolve(run)
    if probe and not has_probe_group(trace):
        raise FileNotFoundError(f"{trace} has no probe group: it was traced without a probe set "
                                f"(knowtrace.ProbeSet); drop --probe to use the training-step trace")
    if trace.is_file():
        # dask-backed, like open_trace; the probe group is the NetCDF group of the same name
        ds = xr.open_dataset(trace, engine="h5netcdf", chunks={}, group=PROBE_GROUP if probe else None)
        ds.attrs = {k: json.loads(v) if k in JSON_ATTRS and isinstance(v, str) else v for k, v in ds.attrs.items()}
        return ds, trace, run_dir
    if probe:
        return open_trace(trace / PROBE_GROUP), trace / PROBE_GROUP, run_dir
    return open_trace(trace), trace, run_dir


def has_probe_group(trace: Path) -> bool:
    """Whether a trace (Zarr store or exported .nc file) holds a probe group."""
    return PROBE_GROUP in netcdf_groups(trace) if trace.is_file() else (trace / PROBE_GROUP).exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _first_last(da: xr.DataArray) -> dict:
    """Mean over samples of each sample's first and last finite value (samples are NaN at steps
    where they were not in the batch)."""
    v = np.asarray(da.transpose(STEP, ...).values, dtype=np.float64).reshape(da.sizes[STEP], -1)  # (step, sample)
    first, last = [], []
    for s in range(v.shape[1]):
        ok = np.flatnonzero(np.isfinite(v[:, s]))
        if len(ok):
            first.append(v[ok[0], s])
            last.append(v[ok[-1], s])
    if not first:
        return None  # never recorded (all NaN)
    return {"first": float(np.mean(first)), "last": float(np.mean(last))}


def summarize(ds: xr.Dataset, trace: Path, run_dir: Path | None, probe: bool = False) -> dict:
    """The numbers ``knowtrace summary`` prints (``probe``: ``ds`` is the trace's probe group)."""
    steps = ds[STEP].values
    where = f"{trace}/{PROBE_GROUP}" if probe and trace.is_file() else str(trace)  # an .nc file's group
    out = {"trace": where, "probe_group": not probe and has_probe_group(trace),
           "steps": int(len(steps)),
           "step_range": [int(steps[0]), int(steps[-1])] if len(steps) else None,
           "samples": int(ds.sizes.get(SAMPLE, 0)),
           **({"sample_ids": [str(i) for i in ds.coords["sample_id"].values]} if "sample_id" in ds.coords else {}),
           "variables": {str(k): list(map(str, v.dims)) for k, v in ds.data_vars.items()}}
    if "is_concept" in ds.coords:
        flags = np.asarray(ds.coords["is_concept"].values, dtype=bool)
        out["concept_tokens"] = flags.sum(-1).astype(int).tolist()  # per sample
    if "token_id" in ds.coords:
        out["answer_tokens"] = (np.asarray(ds.coords["token_id"].values) >= 0).sum(-1).astype(int).tolist()
    if "concept" in ds.coords:
        out["concepts"] = sorted({str(c) for c in np.asarray(ds.coords["concept"].values).ravel()})
    for name in ("K_C", "K_N", "loss_forget", "loss_retain"):
        if name in ds.data_vars:
            out[name] = _first_last(ds[name])
    method = ds.attrs.get("method")
    out["attrs"] = {"method": method.get("name") if isinstance(method, dict) else method,
                    **{k: ds.attrs[k] for k in ("model", "seed", "git_commit", "capture") if k in ds.attrs}}
    if run_dir is not None:
        manifest = _read_json(run_dir / "manifest.json")
        metrics = _read_json(run_dir / "metrics.json")
        # the state unlearn records (running, trained, complete, failed, interrupted; older runs: none), read
        # against the run's lock: a "running" run whose process died is interrupted
        out["run"] = {"dir": str(run_dir), "state": live_state(run_dir, manifest.get("state", "complete")),
                      **({"error": manifest["error"]} if manifest.get("error") else {}),
                      **{k: manifest[k] for k in ("concept", "method", "seed", "images") if k in manifest},
                      **{k: metrics[k] for k in ("steps", "efficacy", "em", "specificity", "diversity") if k in metrics}}
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list) and len(v) > 12:
        return f"{v[:12]} ... ({len(v)} values)"
    return str(v)


# ------------------------------------------------------------------------------- summary
SUMMARY_HELP = """Print what a trace holds.
Steps, samples, variables, first/last K_C and K_N (the mean over samples of each sample's first /
last recorded value), concept tokens per sample, the run's attrs and metrics."""


def _add_summary(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory, trace.zarr or exported .nc")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--probe", action="store_true", help="the probe group of the trace (probe mode)")


def _run_summary(args: argparse.Namespace) -> int:
    info = summarize(*load(args.run, args.probe), probe=args.probe)
    state = info.get("run", {}).get("state", "complete")
    if state != "complete":
        print(f"knowtrace: note: the run is not complete ({state}): its trace holds the steps it reached",
              file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if value is None:
            print(f"{key}: not recorded")
        elif key == "variables":
            print("variables:")
            for name, dims in value.items():
                print(f"  {name}({', '.join(dims)})")
        else:
            print(f"{key}: {_fmt(value)}")
    return 0


# ------------------------------------------------------------------------------- plot
PLOT_HELP = """Draw a view of a trace as HTML and/or PNG.
HTML is interactive and self-contained; PNG needs kaleido and a Chromium. Kinds: tokens (token
log-probs, paper Fig. 2), knowledge (K_C and K_N over steps, Fig. 3), attention (cross-attention
over the image with a step slider, Fig. 8), eps_err (SD noise error map), scatter (K_C vs K_N of
several runs, Fig. 5), audit (the forgetting audit's measurements, RUN/audit/audit.nc as `unlearn audit`
writes it, or that .nc file). Without --html/--png: RUN/plots/<kind>.html."""

KINDS = ("tokens", "knowledge", "attention", "eps_err", "scatter", "audit")
AUDIT_FILE = Path("audit") / "audit.nc"


def _add_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directory, trace.zarr or .nc "
                        "(several only with --kind scatter)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--sample", default="0", help="sample index or id (tokens, attention, eps_err)")
    parser.add_argument("--probe", action="store_true", help="plot the probe group of the trace (probe mode)")
    parser.add_argument("--samples", default="mean", help="knowledge: mean (with a min..max band) | all | an index or id")
    parser.add_argument("--tokens", type=int, nargs="+", help="attention: answer positions (default: concept tokens)")
    parser.add_argument("--layer", default="mean", help="attention: a recorded decoder layer, or mean (default)")
    parser.add_argument("--mode", default="final", choices=("final", "trajectory"), help="scatter: final step or path")
    parser.add_argument("--image", type=Path, help="attention/eps_err: image drawn under the map (default: "
                        f"RUN/samples/{IMAGE_NAMES[0].format(n='N')} if present)")
    parser.add_argument("--log", action="store_true", help="logarithmic K axes (knowledge, scatter)")
    parser.add_argument("--html", type=Path, help="write an HTML file")
    parser.add_argument("--png", type=Path, help="write a PNG (a slider view as a grid of 6 evenly spaced steps)")


def _image(args, ds: xr.Dataset, run_dir: Path | None, sample: int | str):
    path = args.image
    if path is None and run_dir is not None:
        index = plots.sample_index(ds, sample)
        keys = [index] + ([str(ds.coords["sample_id"].values[index])] if "sample_id" in ds.coords else [])
        candidates = [run_dir / "samples" / name.format(n=k) for k in keys for name in IMAGE_NAMES]
        path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None  # the map alone
    return np.asarray(read_image(path, "--image" if args.image is not None else "image"))


def _int_or(text: str):
    """'3' -> 3 (an index, a layer number); anything else stays a string (a sample id, 'mean', 'all')."""
    return int(text) if text.lstrip("-").isdigit() else text


PNG_PANELS = 6  # a slider view's PNG: this many evenly spaced steps in a grid


def _figure(args: argparse.Namespace, ds: xr.Dataset, run_dir: Path | None, panels: int | None = None):
    """The figure of ``--kind``; ``panels``: slider views as a static grid of that many steps."""
    sample = _int_or(args.sample)
    if args.kind == "tokens":
        return plots.token_trajectories(ds, sample=sample)
    if args.kind == "knowledge":
        return plots.knowledge_over_steps(ds, samples=_int_or(args.samples), log_y=args.log)
    if args.kind == "attention":
        plots.variable(ds, "xattn")  # the missing-variable error before the image is looked for
        return plots.attention_slider(ds, sample=sample, tokens=args.tokens, layer=_int_or(args.layer),
                                      image=_image(args, ds, run_dir, sample), panels=panels)
    plots.variable(ds, "eps_err")
    return plots.eps_err_slider(ds, sample=sample, image=_image(args, ds, run_dir, sample), panels=panels)


def load_audit(run: Path) -> tuple[xr.Dataset, Path]:
    """(the audit dataset of RUN = a run directory holding audit/audit.nc, or that file; the folder plots go to)."""
    run = Path(run)
    path = run / AUDIT_FILE if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: audit the run first (unlearn audit {run})")
    _check_netcdf(path)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load(), (run if run.is_dir() else path.parent)


def _run_plot(args: argparse.Namespace) -> int:
    if args.kind != "scatter" and len(args.runs) != 1:
        raise ValueError(f"--kind {args.kind} draws one run; several runs go with --kind scatter")
    if args.kind == "audit":
        from .audit_plots import audit_figure

        ds, where = load_audit(args.runs[0])
        return _save_plot(args, audit_figure(ds), {}, [(ds, where, where)])
    loaded = [load(r, args.probe) for r in args.runs]
    if args.kind == "scatter":
        names = [str(run_dir.name if run_dir is not None else trace.stem) for _, trace, run_dir in loaded]
        if len(set(names)) != len(names):  # same directory names in different places: use the paths
            names = [str(r) for r in args.runs]
        fig = plots.knowledge_scatter({n: ds for n, (ds, _, _) in zip(names, loaded)}, mode=args.mode, log=args.log)
    else:
        ds, trace, run_dir = loaded[0]
        fig = _figure(args, ds, run_dir)
    figures = {}
    if args.png is not None:  # a slider's static image would be its first frame: a grid of steps instead
        sliders = args.kind in ("attention", "eps_err")
        figures[args.png] = _figure(args, ds, run_dir, panels=PNG_PANELS) if sliders else fig
    return _save_plot(args, fig, figures, loaded)


def _save_plot(args: argparse.Namespace, fig, figures: dict, loaded: list) -> int:
    """Write ``fig`` (``figures[path]`` where a path needs another) to --html / --png, else RUN/plots/<kind>.html."""
    targets = [p for p in (args.html, args.png) if p is not None]
    if args.png is not None and args.png.suffix.lower() != ".png":
        raise ValueError(f"--png {args.png}: the file name must end in .png")
    if args.html is not None and args.html.suffix.lower() != ".html":
        raise ValueError(f"--html {args.html}: the file name must end in .html")
    if not targets:
        _, trace, run_dir = loaded[0]
        where = (run_dir if run_dir is not None else trace.parent) / "plots"
        where.mkdir(exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(args.sample))  # a sample id may hold "/"
        suffix = f"-s{safe}" if args.kind in ("tokens", "attention", "eps_err") else ""
        targets = [where / f"{args.kind}{suffix}.html"]
    for path in plots.save({p: figures.get(p, fig) for p in targets}):
        print(path)
    return 0


# ------------------------------------------------------------------------------- export
EXPORT_HELP = """Export a Zarr trace to NetCDF.
Float variables become float32 (NetCDF has no float16); the trace is streamed chunk by chunk. A probe
group becomes the NetCDF group "probe" of the same file (`summary` / `plot` read it with --probe)."""


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run directory or trace.zarr")
    parser.add_argument("--netcdf", type=Path, required=True, metavar="FILE", help="the .nc file to write")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists")


def _run_export(args: argparse.Namespace) -> int:
    trace, _ = resolve(args.run)
    if trace.is_file():
        raise ValueError(f"{trace} is already a NetCDF file; export takes a run directory or a Zarr trace")
    if not args.netcdf.parent.is_dir():
        raise FileNotFoundError(f"--netcdf {args.netcdf}: directory {args.netcdf.parent} does not exist")
    if args.netcdf.is_dir():
        raise IsADirectoryError(f"--netcdf {args.netcdf} is a folder; give the name of the .nc file to write")
    if args.netcdf.exists() and not args.force:
        raise FileExistsError(f"--netcdf {args.netcdf} exists; choose another file or pass --force to replace it")
    out = export_netcdf(trace, args.netcdf)
    print(f"{out} ({out.stat().st_size} bytes)")
    return 0


COMMANDS = {"summary": (SUMMARY_HELP, _add_summary, damaged_trace_errors(_run_summary)),
            "plot": (PLOT_HELP, _add_plot, damaged_trace_errors(_run_plot)),
            "export": (EXPORT_HELP, _add_export, damaged_trace_errors(_run_export))}


def command_parser(prog: str, description: str, version: str, commands: dict) -> argparse.ArgumentParser:
    """A parser with a sub-command per ``commands`` entry (name -> (help, add_arguments, run)); unlearn's too."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in commands.items():
        add_arguments(sub.add_parser(name, help=help_text.splitlines()[0], description=help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    return command_parser("knowtrace", "Look at knowtrace traces: summaries, Plotly views (HTML / PNG), NetCDF "
                          "export.", __version__, COMMANDS)


# user mistakes: a message and exit code 2, no traceback (argparse's own errors exit 2 as well); an
# OSError names its file (a read-only --out, a folder given as a file, a full disk); FloatingPointError: a
# run whose settings made it diverge (non-finite loss, parameters or images)
USER_ERRORS = (KeyError, ValueError, IndexError, OSError, FloatingPointError, plots.ExportUnavailable)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that a run ends the
    same way for both: trace flushed, state recorded, lock released."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_interrupts():
    """Meanwhile SIGTERM raises :class:`Terminated` in the main thread, unless a handler is already set
    (the caller's stays)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(prog: str, parser: argparse.ArgumentParser, commands: dict, argv: list[str] | None) -> int:
    """Parse ``argv`` and run its command (``commands[name][2]``) with the exit codes of both CLIs: 0 done,
    2 a user mistake (one message, no traceback), 130 / 143 interrupted by SIGINT / SIGTERM, 1 a bug
    (the traceback and a line saying it is one)."""
    args = parser.parse_args(argv)
    try:
        with sigterm_interrupts():
            code = commands[args.command][2](args)
        sys.stdout.flush()  # a closed pipe shows here (stdout to a pipe is block-buffered), not at exit
        return code
    except BrokenPipeError:  # the reader stopped early (`knowtrace summary RUN | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{prog}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"{prog}: this is a bug in {prog}, not a mistake in your input; please report it with the traceback "
              f"above", file=sys.stderr)
        return 1


# --quiet: the libraries' own logging and loading bars, switched off
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                     "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
QUIET_LOGGERS = ("transformers", "diffusers", "peft", "accelerate", "huggingface_hub", "torch", "xarray", "zarr")


@contextlib.contextmanager
def quiet_libraries():
    """Nothing on the terminal but errors and the result, while the block runs: library warnings (Python
    warnings, logging below ERROR) and the Hugging Face loading bars off, for this process and the
    processes it starts. The environment covers libraries not imported yet (they read it when imported);
    those already imported are told directly. Everything is restored afterwards (``main`` may be called
    in-process, as the tests do)."""
    import logging
    import warnings

    loggers = {name: logging.getLogger(name) for name in QUIET_LOGGERS}
    levels = {name: logger.level for name, logger in loggers.items()}
    environment = dict(os.environ)
    libraries = [sys.modules[name].utils.logging for name in ("transformers", "diffusers") if name in sys.modules]
    bars = [lib.is_progress_bar_enabled() for lib in libraries]
    hub = sys.modules["huggingface_hub"].utils if "huggingface_hub" in sys.modules else None
    hub_bars = hub is not None and not hub.are_progress_bars_disabled()
    with warnings.catch_warnings():
        os.environ.update(QUIET_ENVIRONMENT)
        warnings.simplefilter("ignore")
        for logger in loggers.values():
            logger.setLevel(logging.ERROR)
        for lib in libraries:
            lib.disable_progress_bar()
        if hub_bars:
            hub.disable_progress_bars()
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(environment)
            for name, logger in loggers.items():
                logger.setLevel(levels[name])
            for lib, enabled in zip(libraries, bars):
                if enabled:
                    lib.enable_progress_bar()
            if hub_bars:
                hub.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    return run_command("knowtrace", build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
