"""The trace schema: the one place that says what a knowtrace dataset holds.

A trace is an ``xarray.Dataset``; every training step appends one slice along ``step``.

dims
    step     training step (int coordinate; appended as training goes)
    sample   a traced record (fixed for the whole trace: the forget set or a probe set)
    token    MLLM: answer position of a sample, 0-based after image-token expansion; SD (with
             attention): position of a prompt's text token, BOS to EOS. Samples shorter than the
             longest are padded (token_id -1, token_str "", NaN values)
    layer, head, y, x   attention / pixel grids, where recorded
    feature  a sparse autoencoder's feature, where recorded (probe mode)

coords (static: written with the first step)
    sample_id(sample)          str: the traced record's id
    layer(layer)               int: decoder layer index of the attention maps (when recorded)
    token_id(sample, token)    int64, -1 on padding (answer tokens; SD: prompt tokens)
    token_str(sample, token)   str, "" on padding
    is_concept(sample, token)  bool: the token belongs to the concept's name
    concept(sample)            str: the concept the sample is about
    mask(sample, y, x)         bool: the concept's pixels (SD traces)
    feature(feature)           int: the SAE feature indices of ``sae_act`` (when recorded)

variables (per step)
    logprob(step, sample, token)   float: log p of the answer token given its prefix
    K_C(step, sample), K_N(step, sample)   knowledge metrics (knowtrace.knowledge)
    loss_forget(step), loss_retain(step)   scalar losses of the step, when given
    xattn(step, sample, layer, token, y, x)   cross-attention of answer tokens to image patches, head
             mean (knowtrace.mllm_attention): token t's row is the query position predicting answer
             token t (the logprob convention); y, x the patch grid; NaN where not recorded
    xattn_head(step, sample, layer, head, token, y, x)   the same per head (``heads="all"``)
    sae_act(step, sample, token, feature)   probe mode only (``trace(..., probes=, sae=SAEOptions)``): the
             activation of an SAE feature (knowtrace.sae: a TopK SAE on the residual stream of one decoder
             layer, named in the SAE's cfg.json) at the position predicting answer token t (the logprob
             convention, as xattn); 0 where the feature is not among the k active ones; NaN on padding
    attr(step, sample, token, y, x)   probe mode only (``trace(..., probes=, attribution=AttributionOptions)``):
             integrated-gradients attribution (captum's LayerIntegratedGradients; knowtrace.attribution) of
             answer token t's log-prob to the image patch representations the language model receives
             (its first decoder layer's input at the image-token positions; baseline zeros by default),
             summed over the hidden dimension, on the xattn patch grid; signed; a map sums to
             logprob[t] minus its value at the baseline, up to attr_delta. NaN for tokens not attributed
             and at probe steps without attribution (``every``)
    attr_delta(step, sample, token)   captum's convergence delta of that map: sum(attr) - (f(input) - f(baseline))
    eps_err(step, sample, y, x)    SD per-latent-pixel squared noise error, mean over channels
             (knowtrace.sd_tracer); K_C / K_N of SD traces are Eq. 4, 6 over it and ``mask``
    xattn(step, sample, layer, token, y, x)   SD: cross-attention of the prompt's text tokens (token =
             prompt position) to the latent pixels (y, x the latent grid of ``mask``), head mean
             (knowtrace.sd_attention); the tracer's caller chooses the layers (unlearn's probe: one
             ``layer``, the mean of every ``attn2`` layer and of its timesteps)

probe group
    Probe mode (knowtrace.probe) writes a second trace with this same schema in the Zarr group
    ``probe`` of the store (the directory ``<trace>/probe``): ``sample`` = the probe set, ``step``
    = the training step after which the probes ran (every k steps), values under inference mode.
    Open it with ``knowtrace.probe.open_probe_trace(path)``.

attrs
    JSON strings: ``model`` (id / revision), ``method`` (name + full config), ``seed``,
    ``versions``, ``git_commit``, ``capture`` (what was recorded, reductions applied).

Storage: float32, except the maps (MAP_VARIABLES: xattn, xattn_head, eps_err), which are float16
only when asked (``map_dtype="float16"``); NetCDF export casts floating variables to float32. String
coords are variable-length UTF-8 (Zarr v3 ``string``). Zarr metadata is consolidated after every
write. No MultiIndex anywhere (NetCDF rejects it).
"""

from __future__ import annotations

STEP, SAMPLE, TOKEN = "step", "sample", "token"

STATIC_COORDS = {
    "sample_id": (SAMPLE,),
    "layer": ("layer",),
    "token_id": (SAMPLE, TOKEN),
    "token_str": (SAMPLE, TOKEN),
    "is_concept": (SAMPLE, TOKEN),
    "concept": (SAMPLE,),
    "mask": (SAMPLE, "y", "x"),
    "feature": ("feature",),
}

STEP_VARIABLES = {
    "logprob": (STEP, SAMPLE, TOKEN),
    "K_C": (STEP, SAMPLE),
    "K_N": (STEP, SAMPLE),
    "loss_forget": (STEP,),
    "loss_retain": (STEP,),
    "xattn": (STEP, SAMPLE, "layer", TOKEN, "y", "x"),
    "xattn_head": (STEP, SAMPLE, "layer", "head", TOKEN, "y", "x"),
    "eps_err": (STEP, SAMPLE, "y", "x"),
    "sae_act": (STEP, SAMPLE, TOKEN, "feature"),
    "attr": (STEP, SAMPLE, TOKEN, "y", "x"),
    "attr_delta": (STEP, SAMPLE, TOKEN),
}

MAP_VARIABLES = frozenset({"xattn", "xattn_head", "eps_err"})  # large: float16 when asked (map_dtype)

PROBE_GROUP = "probe"

JSON_ATTRS = ("model", "method", "seed", "versions", "git_commit", "capture")
