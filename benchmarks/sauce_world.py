"""SAUCE's free choices measured on the world MLLM: layer, feature rule, number of features, intervention
and value (docs/sauce.md). The paper publishes none of them.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/sauce_world.py [--concepts grom,oskel,korvex]
        [--layers 0,1,2,3] [--features 8,32,128] [--rules frequency,mean,ratio] [--edits clamp:0,clamp:-5,scale:-1]

Per concept and layer one SAE is trained as a default sauce run trains it (the run's forget and retain
records, seed 0; ``--sae-steps``); every setting then chooses its features with it, installs the edit,
evaluates exactly as ``unlearn mllm`` does (efficacy, EM, specificity, diversity, K_C, K_N) and takes the
edit off. Prints one JSON row per setting (and the original model's row per concept); ``--out FILE`` keeps
them as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time

from unlearn.eval.mllm import evaluate
from unlearn.methods import get_method
from unlearn.methods.base import StepContext
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data
from unlearn.world.records import world_eval_set
from unlearn.world.source import resolve_model

KEYS = ("efficacy", "em", "specificity", "diversity", "K_C", "K_N")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="grom,oskel,korvex")
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--features", default="8,32,128")
    ap.add_argument("--rules", default="frequency,mean,ratio")
    ap.add_argument("--edits", default="clamp:0,clamp:-5,scale:-1", help="intervention:value, comma-separated")
    ap.add_argument("--sae-steps", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    adapter = load_mllm(resolve_model("world", "mllm"))
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for key in args.concepts.split(","):
        concept, forget, retain = world_data(key, 1, image_size=adapter.crop_side)
        evalset = world_eval_set(key, adapter.crop_side)
        ctx = StepContext(adapter, key, concept.names, seed=0, progress=False)
        base = evaluate(adapter, evalset, concept.names)
        emit({"concept": key, "setting": "original", **{k: round(base[k], 2) for k in KEYS}})
        for layer in (int(x) for x in args.layers.split(",")):
            # the SAE a default run trains, once per concept and layer (its edit taken off again)
            first = get_method("sauce", layer=layer, sae_steps=args.sae_steps)
            start = time.perf_counter()
            first.setup(ctx, forget, retain)
            first.handle.remove()
            sae_seconds = time.perf_counter() - start
            sae = first.trained_sae
            for rule in args.rules.split(","):
                for n in (int(x) for x in args.features.split(",")):
                    for edit in args.edits.split(","):
                        intervention, value = edit.split(":")
                        method = get_method("sauce", layer=layer, rule=rule, features=n, intervention=intervention,
                                            value=float(value))
                        method.setup(ctx, forget, retain, sae=sae[0])
                        m = evaluate(adapter, evalset, concept.names)
                        method.handle.remove()
                        emit({"concept": key, "layer": layer, "rule": rule, "features": n, "edit": edit,
                              "chosen": len(method.chosen), "sae_seconds": round(sae_seconds, 1),
                              "sae_ev": round(sae[2]["explained_variance"], 4), **{k: round(m[k], 2) for k in KEYS}})
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
