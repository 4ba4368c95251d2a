"""The one unlearning loop, for every method of every modality (MLLM and Stable Diffusion).

What it needs from an adapter: ``model`` (the module to train: the MLLM, or SD's UNet) and
``lora_targets`` (its default peft targets). What a method may add: which parts it trains
(:meth:`Method.train_targets`), a reference (``ctx.reference(fn)`` runs ``fn`` on the frozen starting
model: with LoRA the same model with its adapters disabled, else a frozen copy), and the step's
seeded generator (``ctx.generator``: diffusion noise and timesteps).

Seeds, LoRA (peft) or full fine-tuning, Adam, gradient accumulation, autocast where the hardware
has it (bf16 on CUDA), several processes through accelerate (``accelerate launch``; each process
takes its own slice of each step's records and gradients are averaged), callbacks after every step
(the tracer attaches there; they get the step's logs as numbers and its :class:`StepOutput`). A
method's logs stay tensors until the loop reads them once per step, together with the step's checks (the
step's one host synchronisation; the tensors live on the model's device). A non-finite loss, gradient or
parameter stops the run with a clear message, keeping the last good parameters: a per-step copy of the
trained parameters is restored (above ``SNAPSHOT_LIMIT``, with no copy, gradients are checked before each
update instead, one more read per micro-batch). With ``checkpoint_every`` the
main process writes a checkpoint (:mod:`unlearn.checkpoints`) after every that many steps; ``resume``
goes on from one, and the rest of the run is the same, bit for bit, as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .checkpoints import Checkpoint, random_states, save_checkpoint, set_random_states
from .data.records import Record
from .methods.base import Method, StepContext, StepOutput, retain_iterator


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # auto: bf16 on CUDA, none on CPU; the rest: accelerate's
SNAPSHOT_LIMIT = 100_000_000  # trained parameters (elements) up to which a per-step copy is kept


class NonFiniteError(FloatingPointError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    lr: float = 3e-4
    batch_size: int = 2
    grad_accum: int = 1
    seed: int = 0
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: str = ""  # peft regex over module names; "" = the method's parts, else the model family's default
    train_params: str = ""  # full fine-tuning: regex searched in parameter names; "" = the method's parts, else all
    max_grad_norm: float = 0.0  # 0 = no clipping (the paper clips nothing)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        # checked when the settings are made, before anything is loaded or written
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "lora_rank": 1}
        bad = [f"{k}={getattr(self, k)} (must be >= {m})" for k, m in at_least.items() if getattr(self, k) < m]
        bad += [f"{k}={getattr(self, k)} (must be > 0)" for k in ("lr",) if not getattr(self, k) > 0]
        bad += [f"max_grad_norm={self.max_grad_norm} (must be >= 0; 0 = no clipping)"] if self.max_grad_norm < 0 else []
        bad += [f"seed={self.seed} (must be 0 .. 2**32-1)"] if not 0 <= self.seed < 2**32 else []
        if self.mixed_precision not in MIXED_PRECISION:
            bad.append(f"mixed_precision={self.mixed_precision!r} (one of {', '.join(MIXED_PRECISION)})")
        for key in ("lora_targets", "train_params"):
            try:
                re.compile(getattr(self, key))
            except re.error as e:
                bad.append(f"{key}={getattr(self, key)!r} (not a regular expression: {e})")
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}")


class Callback(Protocol):
    def on_step_end(self, step: int, logs: dict, state: "LoopState") -> None: ...


@dataclass
class LoopState:
    model: torch.nn.Module  # unwrapped model being trained
    batch: list[Record]  # the step's forget records (this process's slice)
    accelerator: object
    output: StepOutput | None = None  # what the method returned for the step's last micro-batch


def resolved_mixed_precision(cfg: TrainConfig) -> str:
    """The precision the loop trains in: the config's, "auto" read as bf16 on CUDA and none on CPU."""
    return cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")


def fresh_precision(mixed: str) -> None:
    """accelerate keeps one precision per process and refuses an ``Accelerator`` of another one; a second run in
    the same process (a notebook, a sweep, an audit's relearning) may train in another, so that part of its state
    is made anew when it differs. The process group and device (``PartialState``) stay as they are."""
    from accelerate.state import AcceleratorState

    recorded = AcceleratorState._shared_state.get("_mixed_precision")
    if recorded is not None and recorded != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def precision(cfg: TrainConfig, device: torch.device):
    """A function returning the autocast context the loop's steps run in (a no-op context without mixed
    precision): probes and tracers enter it, so they measure the model as the steps compute it (on a GPU
    in bf16, not at the fp32 cost) and step -1 in the same precision as every later step."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved_mixed_precision(cfg))
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, torch.device(device).type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_lora(model, rank: int, alpha: int, targets: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bool scalar on the tensors' device, True when no element is NaN or inf: one fused norm per
    call instead of a check per tensor (a NaN or inf element makes its tensor's norm non-finite).
    Not read here: the loop reads it with the step's other numbers, in one transfer."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


def select_parameters(model, pattern: str | None) -> int:
    """Full fine-tuning of the parameters whose names match ``pattern`` (all when None); returns their count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(pattern is None or re.search(pattern, name) is not None)
        n += p.requires_grad
    if n == 0:
        raise ValueError(f"no parameter name matches {pattern!r}: nothing would be trained; check train_params")
    return n


def run_loop(adapter, method: Method, forget: list, retain: list, cfg: TrainConfig,
             concept: str, names: tuple[str, ...], callbacks=(), progress: bool = True, checkpoint_every: int = 0,
             checkpoint_dir: Path | None = None, resume: Checkpoint | None = None, on_checkpoint=None) -> dict:
    """Train ``adapter.model`` in place with ``method``; return logs and timings.

    With LoRA the adapter's model becomes a peft model (its base weights untouched). Callbacks with
    ``state_dict`` / ``load_state_dict`` are checkpointed too; those with ``flush`` are flushed first.
    ``on_checkpoint(step)``: after each checkpoint is written.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not method.trains_weights:
        raise ValueError(f"method {method.name!r} trains no weight: run it with unlearn.intervene.apply_method")
    if not forget:
        raise ValueError("the forget set is empty: give at least one record")
    if method.needs_retain and not retain:
        raise ValueError(f"method {method.name!r} needs retain records; none were given")
    seed_everything(cfg.seed)
    mixed = resolved_mixed_precision(cfg)
    fresh_precision(mixed)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                              cpu=not torch.cuda.is_available())
    model = adapter.model
    parts = method.train_targets(adapter, cfg.lora)  # e.g. ESD-x: cross-attention only
    if cfg.lora:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or parts or adapter.lora_targets)
    else:
        select_parameters(model, cfg.train_params or parts)
    reference = None
    if method.needs_reference and not cfg.lora:  # with LoRA the reference is the model with adapters off
        import copy

        # on the accelerator's device, beside the model that prepare() moves there
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    adapter.model = model

    def run_reference(fn):
        with torch.no_grad():
            if reference is not None:
                return fn(reference)
            with unwrapped.disable_adapter():
                return fn(unwrapped)

    def reference_logits(batch):
        return run_reference(lambda m: m(**batch).logits)

    retain_batches = retain_iterator(retain, cfg.batch_size, cfg.seed) if retain else None
    drawn = 0  # retain batches drawn so far: the retain data's position, for checkpoints

    def next_retain() -> list:
        nonlocal drawn
        drawn += 1
        return next(retain_batches)

    # per-process stream: processes draw different noise for their different records
    generator = torch.Generator().manual_seed(cfg.seed * 1009 + accelerator.process_index)
    ctx = StepContext(adapter, concept, tuple(names), next_retain=next_retain if retain else None,
                      reference_logits=reference_logits, run_reference=run_reference if method.needs_reference else None,
                      generator=generator, seed=cfg.seed)
    method.setup(ctx, forget, retain)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and (checkpoint_every or resume is not None):
        raise ValueError("checkpoints and --resume are for single-process runs; run without accelerate launch, or "
                         "without --checkpoint-every")
    # a copy of the trained parameters after every step, to restore if the next one breaks them; for
    # large full fine-tuning the gradient check before each update is the guard instead (no copy)
    keep_snapshots = sum(p.numel() for p in params) <= SNAPSHOT_LIMIT
    # the trained parameters by name, listed once: walking the model's modules every step costs
    # milliseconds, as much as a small model's step
    trained = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in trained} if keep_snapshots else {}

    stateful = [cb for cb in callbacks if hasattr(cb, "state_dict")]
    history, first = [], 0
    if resume is not None:  # after setup, which runs on the starting model as in the first run
        with torch.no_grad():
            for n, p in trained:
                p.copy_(resume.trained[n])
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        torch.set_rng_state(resume.torch_rng)
        if resume.cuda_rng:
            torch.cuda.set_rng_state_all(resume.cuda_rng)
        set_random_states(resume.progress)
        for name, value in resume.progress["method"].items():
            setattr(method, name, value)
        for cb, state in zip(stateful, resume.progress["callbacks"]):
            cb.load_state_dict(state)
        while drawn < resume.progress["retain_drawn"]:
            next_retain()
        history, first = resume.progress["history"], resume.step + 1

    def save(step: int) -> None:
        for cb in callbacks:  # the trace holds every step up to the checkpoint's
            if hasattr(cb, "flush"):
                cb.flush()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        progress_state = {"history": history, "retain_drawn": drawn, **random_states(),
                          "method": {name: getattr(method, name) for name in method.resume_state},
                          "callbacks": [cb.state_dict() for cb in stateful]}
        save_checkpoint(checkpoint_dir, Checkpoint(step, dict(trained), optimizer.state_dict(), generator.get_state(),
                                                   torch.get_rng_state(), cuda_rng, progress_state))

    last_good = snapshot()
    start = time.perf_counter()
    bar = tqdm(range(first, cfg.steps), desc=f"{method.name}", initial=first, total=cfg.steps,
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        ctx.step = step
        checks = []  # per micro-batch: (loss, gradients finite), device scalars read with the step's logs
        for micro in range(cfg.grad_accum):
            # this process's records for this micro-batch: consecutive, cycling through the forget set
            first = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
            batch = [forget[(first + i) % len(forget)] for i in range(cfg.batch_size)]
            with accelerator.accumulate(model), accelerator.autocast():
                out = method.loss(ctx, batch)
                loss = out.loss
                accelerator.backward(loss)
                checks.append((loss.detach(), all_finite([p.grad for p in params])))
                if not keep_snapshots:  # no copy to go back to: a broken gradient must not reach the parameters
                    _stop_if_broken(method.name, step, _read(list(checks[-1])), [], unwrapped, last_good, optimizer)
                method.gradient_hook(ctx)
                if cfg.max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        # the step's one read of the device: its checks and its logs, in one transfer
        values = _read([v for c in checks for v in c] + [all_finite(params)] + list(out.logs.values()))
        n = 2 * len(checks) + 1
        _stop_if_broken(method.name, step, values[:n - 1], values[n - 1:n], unwrapped, last_good, optimizer,
                        keep_snapshots)
        logs = _mean_over_processes(accelerator, dict(zip(out.logs, values[n:])))
        last_good = snapshot()
        history.append({"step": step, **logs})
        bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss")})
        for cb in callbacks:
            cb.on_step_end(step, logs, LoopState(unwrapped, batch, accelerator, out))
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps \
                and accelerator.is_main_process:
            save(step)
            if on_checkpoint is not None:
                on_checkpoint(step)
    model.eval()
    adapter.model = unwrapped
    return {"history": history, "train_seconds": round(time.perf_counter() - start, 3),
            "world_size": world, "mixed_precision": mixed, "accelerator": accelerator}


def _read(values: list) -> list[float]:
    """Scalars (device tensors or numbers) as Python floats, read in one transfer (float64 holds any
    float32 or bf16 value exactly, and a bool as 0 / 1)."""
    if not values:
        return []
    device = next((v.device for v in values if torch.is_tensor(v)), None)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]).tolist()


def _stop_if_broken(method: str, step: int, checks: list[float], params_finite: list[float], model, last_good,
                    optimizer, snapshots: bool = True) -> None:
    """Raise NonFiniteError, with the parameters of the last finished step back in place, for the first of:
    a micro-batch's non-finite loss or gradients (``checks``: loss, gradients finite, per micro-batch), then
    non-finite parameters after the step (``params_finite``: [] or [flag])."""
    for loss, grads_finite in zip(checks[::2], checks[1::2]):
        if not math.isfinite(loss):
            _restore(model, last_good)
            raise NonFiniteError(f"{method}: loss is {loss} at step {step}; the run stops here with the parameters "
                                 f"of the last finished step")
        if not grads_finite:
            optimizer.zero_grad(set_to_none=True)
            _restore(model, last_good)
            raise NonFiniteError(f"{method}: gradients are non-finite at step {step}; the run stops here with the "
                                 f"parameters of the last finished step")
    if params_finite and not params_finite[0]:
        _restore(model, last_good)
        kept = "restored the parameters of the last finished step" if snapshots else \
            "too large to keep a copy of: the parameters are not usable"
        raise NonFiniteError(f"{method}: parameters became non-finite at step {step}; {kept}")


def _mean_over_processes(accelerator, logs: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1 or not logs:
        return logs
    t = torch.tensor(list(logs.values()), device=accelerator.device, dtype=torch.float64)
    return dict(zip(logs, accelerator.reduce(t, reduction="mean").tolist()))


def _restore(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])

