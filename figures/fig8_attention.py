"""Fig. 8: attention of the concept's answer tokens to the image before and after unlearning, GA vs
FTTP (world MLLM, last decoder layer, head mean), with the share of attention that falls on the
concept's patches (the renderer's exact mask, pooled to the patch grid).

    python figures/fig8_attention.py [--concept grom] [--steps 10]
"""

from __future__ import annotations

from common import probe_args, probe_trace, save


def concept_patches(concept: str, grid: tuple[int, int], size: int = 48):
    """(y, x) bool: patches at least half covered by the concept in its unlearning image 0."""
    from unlearn.world.render import world_image

    mask = world_image(concept, "unlearn", 0, size=size).masks[concept].astype(float)
    gy, gx = grid
    return mask.reshape(gy, size // gy, gx, size // gx).mean((1, 3)) >= 0.5


def token_map(ds, step_index: int):
    """Mean over the concept's answer tokens and recorded layers of sample 0: (y, x)."""
    da = ds["xattn"].isel(sample=0, step=step_index).mean("layer")  # (token, y, x)
    concept = ds["is_concept"].isel(sample=0).values.astype(bool)
    return da.isel(token=concept.nonzero()[0]).mean("token").values.astype(float)


def main() -> None:
    args = probe_args(__doc__)
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots


    maps, numbers = {}, {}
    for method in ("ga", "fttp"):
        ds = probe_trace(args, method)
        inside = concept_patches(args.concept, (ds.sizes["y"], ds.sizes["x"]))
        for label, index in (("before", 0), ("after", -1)):
            m = token_map(ds, index)
            maps[(method, label)] = m
            numbers[f"{method}_{label}"] = {"step": int(ds.step.values[index]),
                                            "share_on_concept": float(m[inside].sum() / m.sum()),
                                            "patch_share_of_concept": float(inside.mean())}
    titles = [f"{m.upper()} {label} (step {numbers[f'{m}_{label}']['step']}): "
              f"{100 * numbers[f'{m}_{label}']['share_on_concept']:.0f}% on concept"
              for m in ("ga", "fttp") for label in ("before", "after")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.12)
    top = max(float(np.nanmax(v)) for v in maps.values())
    for i, ((method, label), m) in enumerate(maps.items()):
        fig.add_trace(go.Heatmap(z=m, zmin=0, zmax=top, colorscale="Inferno", showscale=i == 0), row=i // 2 + 1, col=i % 2 + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor=None)
    fig.update_layout(title=f"Attention of the concept's answer tokens over the training image<br>"
                            f"(concept {args.concept}; patches of the concept: "
                            f"{100 * numbers['ga_before']['patch_share_of_concept']:.0f}%)", height=800, width=900)
    save({"fig8_attention": fig}, args.out, png=not args.no_png, numbers={"fig8_attention": numbers})


if __name__ == "__main__":
    main()
