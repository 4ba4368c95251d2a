"""Fig. 2: log-probabilities of every token of the identification answer on the training image
over unlearning steps, GA vs FTTP (world MLLM; step -1 = before training; concept tokens thick red).

    python figures/fig2_token_logprobs.py [--concept grom] [--steps 10]
"""

from __future__ import annotations

from common import probe_args, probe_trace, save
from panels import side_by_side


def main() -> None:
    args = probe_args(__doc__)
    from knowtrace.plots import token_trajectories

    figs, numbers = {}, {}
    for method in ("ga", "fttp"):
        ds = probe_trace(args, method)
        figs[method.upper()] = token_trajectories(ds, 0)
        lp = ds["logprob"].isel(sample=0)
        numbers[method] = {"steps": ds.step.values.tolist(), "tokens": ds["token_str"].isel(sample=0).values.tolist(),
                           "is_concept": ds["is_concept"].isel(sample=0).values.tolist(),
                           "logprob": lp.values.astype(float).tolist()}
    fig = side_by_side(figs, f"Token log-probabilities of the identification answer, concept {args.concept}",
                       yaxis_title="log p(token | image, prefix)")
    fig.update_xaxes(title_text="step")
    save({"fig2_token_logprobs": fig}, args.out, png=not args.no_png, numbers={"fig2_token_logprobs": numbers})


if __name__ == "__main__":
    main()
