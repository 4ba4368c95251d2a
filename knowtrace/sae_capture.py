"""A decoder layer's residual stream at chosen kinds of positions, for sparse autoencoders (:mod:`knowtrace.sae`).

"The residual stream of layer ``l``" is the output of decoder layer ``l``: ``outputs.hidden_states[l + 1]`` of
a forward with ``output_hidden_states=True`` (:mod:`knowtrace.hidden`; for the last layer, transformers
returns it after the final norm). :func:`residual_module` names the module whose output that is, for
hooks that read it without keeping every layer's states (:func:`sae_answer_acts` for traces).

Position kinds of an encoded batch (dict of tensors with ``input_ids``, ``labels``, optional
``attention_mask``, as the MLLM adapters produce, right-padded):

- ``"image"``: the positions of the model config's ``image_token_id`` / ``image_token_index`` in
  ``input_ids`` (the image features fill them; Mllama's single ``<|image|>`` token, whose image enters
  through cross-attention, is one position);
- ``"question"``: attended positions before the row's first labelled one that are not image positions
  (the chat template, the question and the assistant prefix);
- ``"answer"``: labelled positions (``labels != -100``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .capture import Capture
from .hidden import forward_hidden
from .logprobs import IGNORE_INDEX
from .mllm_attention import image_token_id, language_model
from .modes import eval_mode

POSITION_KINDS = ("image", "question", "answer")


@dataclass
class Residuals:
    """Captured rows: ``acts`` (N, d) float32 on the CPU; per row its ``kind`` (one of POSITION_KINDS),
    ``record`` (index of its record over all batches, in order) and ``position`` (in the record's
    sequence, after image-token expansion); ``context_size``: the longest sequence seen."""

    acts: torch.Tensor
    kind: np.ndarray
    record: np.ndarray
    position: np.ndarray
    context_size: int


def text_config(model: torch.nn.Module):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def layer_index(model: torch.nn.Module, layer: int) -> int:
    """``layer`` as an index in 0..L-1 of the language model's decoder layers (negative counts from the end)."""
    n = int(text_config(model).num_hidden_layers)
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer {layer!r} does not exist: the language model has {n} decoder layers (0..{n - 1}, "
                         f"or negative from the end)")
    return layer % n


def residual_module(model: torch.nn.Module, layer: int) -> tuple[str, torch.nn.Module]:
    """(qualified name, module) whose output is ``hidden_states[layer + 1]``: decoder layer ``layer``, or for
    the last layer the final norm (transformers returns the last state after it)."""
    layer = layer_index(model, layer)
    decoder = language_model(model)
    module = decoder.norm if layer == text_config(model).num_hidden_layers - 1 else decoder.layers[layer]
    name = next(n for n, m in model.named_modules() if m is module)
    return name, module


def position_masks(batch: dict, kinds: Sequence[str], image_id: int | None) -> dict[str, torch.Tensor]:
    """Per kind, a (batch, seq) bool mask of its positions in ``batch`` (module docstring)."""
    ids, labels = batch["input_ids"], batch["labels"]
    attended = batch.get("attention_mask", torch.ones_like(ids)).bool()
    answer = labels != IGNORE_INDEX
    image = ids == image_id if image_id is not None else torch.zeros_like(answer)
    seq = torch.arange(ids.shape[1], device=ids.device)
    first = torch.where(answer.any(1), answer.int().argmax(1), ids.shape[1])  # a row with no answer: all question
    question = attended & ~image & (seq[None] < first[:, None])
    masks = {"image": image & attended, "question": question, "answer": answer & attended}
    return {kind: masks[kind] for kind in kinds}


def check_kinds(positions: str | Sequence[str]) -> tuple[str, ...]:
    kinds = (positions,) if isinstance(positions, str) else tuple(positions)
    unknown = [k for k in kinds if k not in POSITION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"positions must be some of {POSITION_KINDS}, got {list(kinds)}")
    return tuple(k for k in POSITION_KINDS if k in kinds)


@torch.inference_mode()
def capture_residuals(model: torch.nn.Module, batches: Iterable[dict], layer: int,
                      positions: str | Sequence[str] = POSITION_KINDS, progress: bool = True) -> Residuals:
    """The residual stream of decoder layer ``layer`` (``hidden_states[layer + 1]``) at ``positions`` of every
    record of ``batches`` (encoded batches with ``labels``), batch by batch under eval mode: only the
    selected rows are kept (float32, on the CPU); rows in record order, then sequence order."""
    kinds = check_kinds(positions)
    index = layer_index(model, layer)
    try:  # image positions are never question positions, asked for or not
        image_id = image_token_id(model.config)
    except ValueError:
        if "image" in kinds:
            raise
        image_id = None  # a text model
    device = next(model.parameters()).device
    # the logits are not needed: only the last position's where the model can skip the others
    skip_logits = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    acts, kind, record, position, seen, longest = [], [], [], [], 0, 0
    with eval_mode(model):
        for batch in tqdm(batches, desc=f"residuals of layer {index}", disable=not progress, leave=False):
            if "labels" not in batch or "input_ids" not in batch:
                raise ValueError("every batch needs input_ids and labels (encode the records with their answers)")
            masks = position_masks(batch, kinds, image_id)
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
            _, hidden = forward_hidden(model, {**inputs, **skip_logits})
            state = hidden[index + 1]  # (batch, seq, d)
            which = torch.stack([masks[k] for k in kinds]).to(state.device)  # (kinds, batch, seq)
            selected = which.any(0)
            rows, cols = selected.nonzero(as_tuple=True)  # row-major: record order, then position order
            acts.append(state[rows, cols].float().cpu())
            kind.append(which[:, rows, cols].int().argmax(0).cpu())  # kinds are disjoint
            record.append(rows.cpu() + seen)
            position.append(cols.cpu())
            seen += batch["input_ids"].shape[0]
            longest = max(longest, int(batch.get("attention_mask", batch["input_ids"]).shape[1]))
            del hidden, state
    if not acts:
        raise ValueError("no batches were given")
    return Residuals(torch.cat(acts), np.array(kinds)[torch.cat(kind).numpy()], torch.cat(record).numpy(),
                     torch.cat(position).numpy(), longest)


# ---------------------------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class SAEOptions:
    """What a trace records of a sparse autoencoder: ``sae`` (:class:`knowtrace.sae.TopKSAE`) reading the
    residual of decoder layer ``layer``; ``features``: the feature indices recorded (``sae_act``)."""

    sae: torch.nn.Module
    layer: int
    features: tuple[int, ...]

    def __post_init__(self):
        features = tuple(int(f) for f in self.features)
        d_sae = self.sae.W_enc.shape[1]
        bad = [f for f in features if not 0 <= f < d_sae]
        if not features or bad or len(set(features)) != len(features):
            raise ValueError(f"features must be distinct indices in 0..{d_sae - 1} (the SAE's d_sae = {d_sae}), "
                             f"got {list(self.features)}")
        object.__setattr__(self, "features", features)


@torch.no_grad()
def answer_feature_acts(sae: torch.nn.Module, state: torch.Tensor, labels: torch.Tensor, features: Sequence[int],
                        ignore_index: int = IGNORE_INDEX) -> list[torch.Tensor]:
    """Per batch row, (n_answer, n_features) float32: the SAE's activations of ``features`` on ``state``
    (batch, seq, d) at the position that *predicts* each answer token (labelled position - 1: entry t goes
    with ``logprob[t]`` and ``xattn``'s row t), computed on the SAE's device."""
    answer = labels[:, 1:] != ignore_index  # (batch, seq - 1): position p predicts the token at p + 1
    if (labels[:, 0] != ignore_index).any():
        raise ValueError("an answer token at position 0 has no position that predicts it")
    rows, cols = answer.nonzero(as_tuple=True)
    param = sae.W_enc
    acts = sae.encode(state[rows, cols].to(param.device, param.dtype))  # (n_answer in all rows, d_sae)
    chosen = acts[:, torch.as_tensor(features, device=param.device)].float()
    return list(chosen.split(answer.sum(1).tolist()))


class SAEActCapture(Capture):
    """A :class:`~knowtrace.capture.Capture` of :func:`answer_feature_acts` on the output of the residual
    module of ``options.layer``, for the forward that :meth:`begin` (given its labels) opened;
    :class:`~knowtrace.logprobs.LogProbCapture` calls ``begin`` and ``read`` around each forward."""

    def __init__(self, model: torch.nn.Module, options: SAEOptions):
        super().__init__(model)
        self.options = options
        self.hook_name, self.module = residual_module(model, options.layer)
        width = int(text_config(model).hidden_size)
        if options.sae.W_enc.shape[0] != width:
            raise ValueError(f"the SAE reads width {options.sae.W_enc.shape[0]}, the language model's residual "
                             f"stream is {width} wide: it was trained for another model")
        self.features = options.features
        self.recording = False
        self._labels, self._acts = None, None

    def _install(self) -> None:
        self._handles = [self.module.register_forward_hook(self._hook)]

    def _remove(self) -> None:
        super()._remove()
        self.recording, self._labels, self._acts = False, None, None

    def begin(self, labels: torch.Tensor) -> None:
        self._labels, self._acts, self.recording = labels, None, True

    def _hook(self, module, args, output):
        if not self.recording:
            return
        state = output[0] if isinstance(output, tuple) else output  # (batch, seq, d)
        if state.shape[:2] == self._labels.shape:  # not a cached generation step
            self._acts = answer_feature_acts(self.options.sae, state, self._labels, self.features)

    def read(self) -> list[torch.Tensor]:
        """Per batch row of the recorded forward, (n_answer, n_features) on the CPU; recording stops."""
        acts, self._acts, self._labels, self.recording = self._acts, None, None, False
        if acts is None:
            raise RuntimeError(f"{self.hook_name} produced no output of the recorded forward's shape: the SAE's "
                               f"layer did not run on it")
        return list(torch.cat(acts).cpu().split([a.shape[0] for a in acts]))  # one transfer
