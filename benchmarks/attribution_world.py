"""Attribution vs attention on the world MLLM (docs/attribution.md): where each puts the concept, before and after
unlearning, and what attribution probes cost a training run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/attribution_world.py shares [--concepts grom,oskel,vorn] [--steps 10]
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/attribution_world.py cost [--pairs 60] [--n-steps 16] [--tokens 0] [--every 10] [--no-delta]

``shares``: per concept, the GA and FTTP runs Fig. 8 uses (``--trace-attention``, saved under ``--runs`` and reused),
and Fig. 8's numbers: the share of the concept's answer tokens' attention (last layer, head mean, probe sample 0: a
question on the training image) and of their integrated-gradients attribution (absolute value; baseline zeros,
16 path points) that falls on the concept's patches (the renderer's mask, pooled to the patch grid), on the
starting model and after the run; with the concept's share of the patches (what a uniform map would give).

``cost``: the world MLLM with LoRA, FTTP's step on 2 forget records (knowtrace_overhead.py's step and schedule:
untraced and traced steps alternate in pairs of random order, same model and batch); traced steps record log-probs
and, after every 10th traced step, probes of 2 records with attribution of the concept's answer tokens
(``AttributionOptions(every=--every, n_steps=--n-steps, tokens=..., delta=not --no-delta)``). The ratio of the traced steps' total time (probes
included) to the untraced ones'; and one probe's median time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "figures"))


def shares(args) -> None:
    import numpy as np

    import fig8_attention as fig8
    from common import mllm_run, probe_trace
    from unlearn.runs import read_manifest, reload, run_kind

    table = {}
    for concept in args.concepts.split(","):
        start = None
        for method in ("ga", "fttp"):
            ns = argparse.Namespace(runs=args.runs, concept=concept, steps=args.steps, world_dir=None, quiet=True)
            ds = probe_trace(ns, method)
            run = mllm_run(args.runs, concept, method, args.steps, attention=True, progress=False)
            images = read_manifest(run)["images"]
            if start is None:
                start = fig8.attribution_map(run_kind("mllm").load_model(read_manifest(run)["model"]), ds, concept,
                                             images)
            inside = fig8.concept_patches(concept, (ds.sizes["y"], ds.sizes["x"]))
            after = fig8.attribution_map(reload(run)[0], ds, concept, images)
            row = {"patches_on_concept": float(inside.mean())}
            for label, index, attr in (("before", 0, start), ("after", -1, after)):
                m = fig8.token_map(ds, index)
                row[f"attention_{label}"] = float(m[inside].sum() / m.sum())
                row[f"attribution_{label}"] = fig8.on_concept(attr, inside)
                row[f"attribution_sum_{label}"] = float(attr.sum())
                row[f"K_C_{label}"] = float(ds.K_C.isel(sample=0, step=index))
            table[f"{concept}/{method}"] = row
            print(concept, method, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    means = {k: float(np.mean([r[k] for r in table.values()])) for k in next(iter(table.values()))}
    print("mean", json.dumps({k: round(v, 3) for k, v in means.items()}))


def cost(args) -> None:
    import torch

    from knowtrace import AttributionOptions, ProbeSet, trace
    from knowtrace_overhead import run_schedule, world_fttp_step
    from unlearn.tracing import traced_samples

    adapter, concept, forget, base, step = world_fttp_step(args.concept)
    records = forget[:2]
    samples = traced_samples(adapter, forget, concept.names)
    probe_records = [r for r in forget if r.image is not None][2:4]
    probe_samples = traced_samples(adapter, probe_records, concept.names)
    shortest = min(len(s.token_ids) for s in probe_samples)
    tokens = sorted({i for s in probe_samples for i, c in enumerate(s.is_concept) if c and i < shortest}) or [0]
    tokens = tokens[:args.tokens] if args.tokens else tokens
    probes = ProbeSet([adapter.encode(probe_records)], probe_samples, every=10)
    options = AttributionOptions(every=args.every, n_steps=args.n_steps, tokens=tuple(tokens), delta=not args.no_delta)
    for _ in range(3):
        step()
    with tempfile.TemporaryDirectory() as tmp:
        timings, probe_seconds = run_schedule(trace(base, Path(tmp) / "t.zarr", samples, probes=probes,
                                                    attribution=options), step, [r.id for r in records], args.pairs, 3)
    plain, traced = timings.split(timings.times)
    print(f"world MLLM + LoRA, batch 2, torch threads {torch.get_num_threads()}, {args.pairs} pairs; attribution of "
          f"answer tokens {tokens} of 2 probe records, n_steps {args.n_steps} ({options.method}), every {args.every} "
          f"traced steps (probes every 10), convergence delta {'off' if args.no_delta else 'on'}")
    print(f"  untraced step median {statistics.median(plain) * 1e3:.1f} ms; probes (with and without attribution) "
          f"median {statistics.median(probe_seconds[1:]) * 1e3:.0f} ms, max {max(probe_seconds[1:]) * 1e3:.0f} ms "
          f"({len(probe_seconds)} probes, the first left out)")
    print(f"  ratio traced / untraced: {sum(traced) / sum(plain):.3f} of totals (amortised; target <= 1.15)")


def fidelity(args) -> None:
    """How far a short path's maps are from a long one's, on the world MLLM (no unlearning): per concept, its
    unlearning-image questions, the concept tokens' summed map at ``n_steps`` 1, 2, 4, 16 against 64 points."""
    import numpy as np
    import torch

    import fig8_attention as fig8
    from knowtrace import AttributionOptions, ImageAttribution
    from unlearn.models import load_mllm
    from unlearn.tracing import traced_samples
    from unlearn.world.concepts import BY_KEY
    from unlearn.world.records import world_eval_set
    from unlearn.world.source import resolve_model

    adapter = load_mllm(resolve_model("world", "mllm"))
    steps = (1, 2, 4, 16, 64)
    rows = {n: {"corr": [], "share": [], "abs_delta": []} for n in steps}
    for concept in args.concepts.split(","):
        records = [r for r in world_eval_set(concept, adapter.crop_side).efficacy if r.image is not None][:args.records]
        for record, sample in zip(records, traced_samples(adapter, records, BY_KEY[concept].names)):
            tokens = tuple(i for i, c in enumerate(sample.is_concept) if c)
            batch = adapter.encode([record], train=True)
            maps = {}
            for n in steps:
                m, d = ImageAttribution(adapter.model, AttributionOptions(n_steps=n, tokens=tokens)).attribute(batch)[0]
                maps[n] = np.asarray(m[list(tokens)].sum(0), dtype=float)
                rows[n]["abs_delta"].append(float(torch.as_tensor(d[list(tokens)]).abs().sum()))
            inside = fig8.concept_patches(concept, maps[64].shape)
            for n in steps:
                rows[n]["corr"].append(float(np.corrcoef(maps[n].ravel(), maps[64].ravel())[0, 1]))
                rows[n]["share"].append(fig8.on_concept(maps[n], inside))
    print(f"world MLLM, concepts {args.concepts}, {args.records} unlearning-image questions each; the concept tokens' "
          f"summed map; Pearson r against n_steps 64; share of |map| on the concept's patches; |delta| summed")
    for n in steps:
        r = rows[n]
        print(f"  n_steps {n:>2}: r {np.mean(r['corr']):.3f} (min {np.min(r['corr']):.3f}), share "
              f"{np.mean(r['share']):.3f}, |delta| {np.mean(r['abs_delta']):.4f}  ({len(r['corr'])} maps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("shares", "cost", "fidelity"))
    ap.add_argument("--records", type=int, default=4, help="fidelity: questions per concept")
    ap.add_argument("--concepts", default="grom,oskel,vorn")
    ap.add_argument("--concept", default="grom", help="cost: the concept whose forget records train")
    ap.add_argument("--steps", type=int, default=10, help="shares: training steps of each run")
    ap.add_argument("--runs", type=Path, default=Path("runs/figures"))
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=10, help="cost: attribution at every N-th traced step (probes: 10)")
    ap.add_argument("--no-delta", action="store_true", help="cost: AttributionOptions(delta=False)")
    ap.add_argument("--tokens", type=int, default=0, help="cost: attribute only the first N concept tokens (0: all)")
    args = ap.parse_args()
    {"shares": shares, "cost": cost, "fidelity": fidelity}[args.part](args)


if __name__ == "__main__":
    main()
