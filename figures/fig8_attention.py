"""Fig. 8: attention of the concept's answer tokens to the image before and after unlearning, GA vs
FTTP (world MLLM, last decoder layer, head mean), with the share of attention that falls on the
concept's patches (the renderer's exact mask, pooled to the patch grid); below it, the integrated-gradients
attribution of the same tokens' log-probs to the image patch representations (knowtrace.attribution,
baseline zeros, IG_STEPS path points), on the starting model and on each run's trained model, with the
share of its absolute value on the concept's patches (attribution is signed: |attr| is how much a patch
moves the log-prob, either way).

    python figures/fig8_attention.py [--concept grom] [--steps 10]
"""

from __future__ import annotations

from common import mllm_run, probe_args, probe_trace, save

IG_STEPS = 16


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


def attribution_map(adapter, ds, concept: str, images: int, n_steps: int = IG_STEPS):
    """Sum over the concept's answer tokens of probe sample 0's integrated-gradients map (y, x) under ``adapter``'s
    model: by IG's linearity, the attribution of the name's summed log-prob."""
    import numpy as np

    import knowtrace
    from unlearn.world.records import world_eval_set

    sample_id = str(ds.sample_id.values[0])
    record = next(r for r in world_eval_set(concept, adapter.crop_side, n_images=images).efficacy if r.id == sample_id)
    tokens = tuple(int(i) for i in ds["is_concept"].isel(sample=0).values.astype(bool).nonzero()[0])
    options = knowtrace.AttributionOptions(n_steps=n_steps, tokens=tokens)
    device = next(adapter.model.parameters()).device
    batch = {k: v.to(device) for k, v in adapter.encode([record], train=True).items()}
    maps, _ = knowtrace.ImageAttribution(adapter.model, options).attribute(batch)[0]
    return np.asarray(maps[list(tokens)].sum(0), dtype=float)


def on_concept(m, inside) -> float:
    """The share of a map's absolute mass on the concept's patches."""
    import numpy as np

    return float(np.abs(m[inside]).sum() / np.abs(m).sum())


def main() -> None:
    args = probe_args(__doc__)
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from unlearn.runs import read_manifest, reload, run_kind

    maps, attrs, numbers = {}, {}, {}
    start = None  # the starting model (step -1), the same for both methods: loaded and attributed once
    for method in ("ga", "fttp"):
        ds = probe_trace(args, method)
        run = mllm_run(args.runs, args.concept, method, args.steps, attention=True, world_dir=args.world_dir,
                       progress=not args.quiet)
        images = read_manifest(run)["images"]
        if start is None:
            start = attribution_map(run_kind("mllm").load_model(read_manifest(run)["model"], args.world_dir), ds,
                                    args.concept, images)
        inside = concept_patches(args.concept, (ds.sizes["y"], ds.sizes["x"]))
        for label, index in (("before", 0), ("after", -1)):
            m = token_map(ds, index)
            a = start if label == "before" else attribution_map(reload(run, args.world_dir)[0], ds, args.concept, images)
            maps[(method, label)], attrs[(method, label)] = m, a
            numbers[f"{method}_{label}"] = {"step": int(ds.step.values[index]),
                                            "share_on_concept": float(m[inside].sum() / m.sum()),
                                            "attribution_share_on_concept": on_concept(a, inside),
                                            "attribution_sum": float(a.sum()),
                                            "patch_share_of_concept": float(inside.mean())}
    titles = [f"{m.upper()} {label} (step {numbers[f'{m}_{label}']['step']}): "
              f"{100 * numbers[f'{m}_{label}'][key]:.0f}% on concept"
              for key in ("share_on_concept", "attribution_share_on_concept")
              for m in ("ga", "fttp") for label in ("before", "after")]
    fig = make_subplots(rows=4, cols=2, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.06)
    top = max(float(np.nanmax(v)) for v in maps.values())
    extent = max(float(np.nanmax(np.abs(v))) for v in attrs.values())
    for i, ((method, label), m) in enumerate(maps.items()):
        fig.add_trace(go.Heatmap(z=m, zmin=0, zmax=top, colorscale="Inferno", showscale=i == 0,
                                 colorbar=dict(title="attention", y=0.78, len=0.45)), row=i // 2 + 1, col=i % 2 + 1)
    for i, ((method, label), a) in enumerate(attrs.items()):  # signed: a diverging scale centred on 0
        fig.add_trace(go.Heatmap(z=a, zmin=-extent, zmax=extent, colorscale="RdBu_r", showscale=i == 0,
                                 colorbar=dict(title="attribution", y=0.22, len=0.45)), row=i // 2 + 3, col=i % 2 + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor=None)
    fig.update_layout(title=f"Attention (rows 1-2) and integrated-gradients attribution (rows 3-4) of the concept's "
                            f"answer tokens over the training image<br>(concept {args.concept}; patches of the concept: "
                            f"{100 * numbers['ga_before']['patch_share_of_concept']:.0f}%)", height=1500, width=900)
    save({"fig8_attention": fig}, args.out, png=not args.no_png, numbers={"fig8_attention": numbers})


if __name__ == "__main__":
    main()
