"""A method that trains no weight (``Method.trains_weights`` False, e.g. SAUCE), run where the training
loop would run: its ``setup`` changes how the model computes (a hook), then one step, step 0, lets the
callbacks see the changed model: a forward of the first forget batch under no gradient (the tracer
records its token log-probs and runs its probes; the evaluation curve evaluates), logged as
``nll_forget``. Same arguments and result as :func:`unlearn.loop.run_loop`, so a run calls either.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .loop import LoopState, TrainConfig, _read, seed_everything
from .methods.base import Method, StepContext
from .methods.losses import records_nll


def apply_method(adapter, method: Method, forget: list, retain: list, cfg: TrainConfig, concept: str,
                 names: tuple[str, ...], callbacks=(), progress: bool = True, checkpoint_every: int = 0,
                 checkpoint_dir=None, resume=None, on_checkpoint=None) -> dict:
    if method.trains_weights:
        raise ValueError(f"method {method.name!r} trains weights: run it with unlearn.loop.run_loop")
    if resume is not None:
        raise ValueError(f"method {method.name!r} trains no weight and has no checkpoint to resume from; run it again "
                         f"with --overwrite")
    if not forget:
        raise ValueError("the forget set is empty: give at least one record")
    if method.needs_retain and not retain:
        raise ValueError(f"method {method.name!r} needs retain records; none were given")
    seed_everything(cfg.seed)
    start = time.perf_counter()
    ctx = StepContext(adapter, concept, tuple(names), seed=cfg.seed, progress=progress,
                      generator=torch.Generator().manual_seed(cfg.seed * 1009))
    model = adapter.model.eval()
    with tqdm(total=1, desc=method.name, disable=not progress) as bar:
        method.setup(ctx, forget, retain)
        batch = forget[:cfg.batch_size]
        with torch.no_grad():
            nll = records_nll(adapter, batch)
        logs = dict(zip(["nll_forget"], _read([nll])))
        for cb in callbacks:
            cb.on_step_end(0, logs, LoopState(model, batch, None))
        bar.update()
    return {"history": [{"step": 0, **logs}], "train_seconds": round(time.perf_counter() - start, 3),
            "world_size": 1, "mixed_precision": "no"}
