"""A TopK SAE on the world MLLM's residual stream: capture, training time and quality (docs/sae.md).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/sae_world.py [--layer 2] [--expansion 8] [--k 32]

The data: the forget and retain records of ``--concepts`` (as ``unlearn mllm`` builds them, ``--images``
unlearning images each; records shared between concepts counted once), encoded by the world MLLM's
adapter, residual of decoder layer ``--layer`` at image, question and answer positions; every fifth record is
held out. Prints the figures as JSON (capture and training seconds, rows, explained variance, L0, dead
fraction, MSE on the training rows and on the held-out ones).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from knowtrace.sae import sae_quality, save_sae, train_sae
from knowtrace.sae_capture import capture_residuals, residual_module
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data
from unlearn.world.source import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default="grom,oskel,vorn,korvex,blip,teodric")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="save the SAE there (SAELens layout)")
    args = ap.parse_args()

    adapter = load_mllm(resolve_model("world", "mllm"))
    records = {}
    for key in args.concepts.split(","):
        _, forget, retain = world_data(key, args.images, image_size=adapter.crop_side)
        records.update({r.id: r for r in forget + retain})
    records = list(records.values())
    batches = [adapter.encode(records[i:i + 16], train=True, cache=False) for i in range(0, len(records), 16)]

    start = time.perf_counter()
    res = capture_residuals(adapter.model, batches, args.layer)
    captured = time.perf_counter() - start
    d_in = res.acts.shape[1]
    held = torch.from_numpy(res.record % 5 == 4)  # every fifth record held out: quality on rows not trained on
    start = time.perf_counter()
    sae = train_sae(res.acts[~held], args.expansion * d_in, args.k, steps=args.steps, lr=args.lr,
                    batch_size=args.batch_size, seed=args.seed)
    trained = time.perf_counter() - start
    quality = sae_quality(sae, res.acts[~held])
    held_out = {f"held_out_{key}": round(v, 4) for key, v in sae_quality(sae, res.acts[held]).items()}
    kinds = {k: int((res.kind == k).sum()) for k in sorted(set(res.kind))}
    figures = {"records": len(records), "positions": kinds, "d_in": d_in, "d_sae": sae.d_sae, "k": sae.k,
               "layer": args.layer, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
               "capture_s": round(captured, 2), "train_s": round(trained, 2), "threads": torch.get_num_threads(),
               **{key: round(v, 4) if isinstance(v, float) else v for key, v in quality.items()}, **held_out}
    print(json.dumps(figures, indent=1))
    if args.out:
        save_sae(sae, args.out, model_name="world", hook_name=residual_module(adapter.model, args.layer)[0],
                 layer=args.layer, positions=("image", "question", "answer"), context_size=res.context_size,
                 dataset_path=f"world:{args.concepts}", extra={"quality": quality, **held_out})


if __name__ == "__main__":
    main()
