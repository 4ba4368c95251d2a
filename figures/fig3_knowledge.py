"""Fig. 3: Conceptual (K_C) and Natural (K_N) knowledge over unlearning steps, GA vs FTTP, on the world
MLLM (the training image's questions, step -1 = before training).

    python figures/fig3_knowledge.py [--concept grom] [--steps 10]
"""

from __future__ import annotations

from common import probe_args, probe_trace, save
from panels import side_by_side


def main() -> None:
    args = probe_args(__doc__)
    from knowtrace.plots import knowledge_over_steps

    figs, numbers = {}, {}
    for method in ("ga", "fttp"):
        ds = probe_trace(args, method)
        figs[f"MLLM {method.upper()}"] = knowledge_over_steps(ds, log_y=True)
        numbers[f"mllm_{method}"] = {"steps": ds.step.values.tolist(),
                                     "K_C": ds["K_C"].mean("sample").values.astype(float).tolist(),
                                     "K_N": ds["K_N"].mean("sample").values.astype(float).tolist()}
    fig = side_by_side(figs, f"K_C and K_N over steps (log scale), concept {args.concept}", rows_per_fig=2)
    save({"fig3_knowledge": fig}, args.out, png=not args.no_png, numbers={"fig3_knowledge": numbers})


if __name__ == "__main__":
    main()
