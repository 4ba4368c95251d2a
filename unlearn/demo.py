"""The main job (``make demo`` / ``unlearn demo``): unlearn one world concept from the world MLLM with
GA and with FTTP while tracing, evaluate both, and write ``OUT/report.html`` and ``OUT/summary.txt``.

Builds the world MLLM if the cache lacks it (a few minutes on 2 cores), else loads it. The learning
rate is the world's calibrated one (3e-3; docs/methods.md): at the paper's 3e-4 nothing moves in
10 steps on the tiny model.
"""

from __future__ import annotations

from pathlib import Path

from .report import summary_text, write_report
from .run_mllm import WORLD_LR, run_mllm

DEMO_CONCEPT = "grom"  # a cartoon character with a 3-token name
DEMO_LR = WORLD_LR  # the world's calibrated lr


def run_demo(out: Path = Path("runs/demo"), concept: str = DEMO_CONCEPT, steps: int = 10, lr: float = DEMO_LR,
             methods: tuple[str, ...] = ("ga", "fttp"), seed: int = 0, world_dir=None, world_config=None,
             progress: bool = True) -> Path:
    out = Path(out)
    runs = {}
    for method in methods:
        run_mllm(concept, method, out / method, steps=steps, seed=seed, options={"lr": lr}, trace=True,
                 trace_attention=True, world_dir=world_dir, world_config=world_config, progress=progress,
                 overwrite=True)
        runs[method] = out / method
    report = write_report(runs, out / "report.html", title=f"GA vs FTTP on the world concept {concept!r}")
    print(summary_text(runs), end="")
    return report
