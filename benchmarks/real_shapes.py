"""Benchmark: the toolkit at real model shapes (random weights): what tracing, probes and the unlearn
loop cost a training step, and the memory they take.

Models (built from configs, no hub):

* ``mllm``: a LLaVA-1.5-7B-shaped ``LlavaForConditionalGeneration``: CLIP ViT-L/14-336 vision layers
  (hidden 1024, 16 heads, intermediate 4096, 336 px, patch 14: 576 image positions), Llama text
  layers (hidden 4096, 32 heads, intermediate 11008, vocab 32064), 2 vision and 2 decoder layers
  (``--full-depth``: 24 and 32, the real model); the world tokenizer and world records at 336 px, each
  question lengthened with world sentences to a ``--seq``-token conversation (576 of them image
  positions). LoRA on the adapter's default targets (the MLLM default), FTTP, Adam lr 3e-4.
* ``sd``: SD-1.4's UNet (``UNet2DConditionModel`` with SD-1.4's config: 320/640/1280/1280, cross-attention
  768, attention_head_dim 8, 64x64 latents) with SD-1.4's text encoder (CLIP ViT-L/14 text, 77
  tokens) and a VAE of SD-1.4's layout (factor 8, 4 latent channels) at width 32: the VAE encodes the
  512 px forget images once, outside the measured steps. World forget images of a concept at 512 px
  with their masks, FTTP, lr 1e-5. Trained parts (``--sd-train``): ``full``, the toolkit's SD default
  (full UNet fine-tuning: ~14 GB of float32 weights, gradients and Adam moments, more than this CPU
  machine's share), or ``lora``, the SD adapter's LoRA default (``SDAdapter.lora_targets``: q/k/v/out
  of every attn1 and attn2); ``auto``: full on CUDA, LoRA on the CPU.
* ``vocab``: :func:`knowtrace.logprobs.token_logprobs` on (1, seq, 152064) logits (Qwen2-VL's vocabulary)
  with 20 and with all positions labelled: the extra peak memory against the logits' own size.

Every variant goes through the toolkit's own code: the unlearn loop (``run_loop`` with the FTTP
method) trains; the tracer is the run's (``unlearn.tracing.start_tracer`` for the MLLM, with its
attention probe; for SD ``SDStepErrorCallback(attention=True)`` in the traced steps (each step's own errors, K
and attention maps, as ``unlearn sd --trace-attention --trace-source step`` attaches it) and the probe of
``SDTraceCallback(attention=True)`` (``unlearn sd --trace-attention``: 5 timesteps x the forget images).

How it is measured, and why. This machine is shared and its speed drifts, so the variants run side
by side in one loop: a callback of the loop (:class:`SideBySide`) makes its steps alternate between
untraced (tracer paused) and traced steps, pairs in seeded random order, and after every pair runs one
bare step (plain PyTorch: forward, the FTTP loss, backward, Adam, no toolkit code) on the same model
and batch; figures are ratios of medians. Two warm-up steps (the second traced: it creates the trace
store) and one warm-up bare step are not timed. A traced step's time includes the tracer's work in
the forward (the log-prob hook) and after it (``record``: K, buffered Zarr append). The probe (which
a run makes after every step) is timed apart, ``--probe-repeats`` times after the loop; its amortised
figure is ``1 + probe / (10 x untraced step)``: what a probe after every 10th step adds.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each step); on the CPU the
process's peak resident set (``VmHWM`` of /proc/self/status, reset through /proc/self/clear_refs
before each step, after ``malloc_trim`` has given freed heap pages back): it sees every allocation,
torch's included (tracemalloc does not), and large tensors are mmap-ed and returned to the system when
freed, so a step's peak is that step's. Both
include the model's weights, as a user's device must hold them.

    OMP_NUM_THREADS=2 python benchmarks/real_shapes.py [--part vocab mllm sd] [--repeats 2] [--sd-repeats 1]
    python benchmarks/real_shapes.py --part vocab mllm --device cuda --dtype bf16 --full-depth --batch 2 --repeats 10

On 2 shared CPU cores the defaults take about 6 minutes for the MLLM (25-45 s a step) and 15-20 for
SD (50-140 s a step, a probe 1.3 steps): too few steps for side-by-side ratios to resolve a few per
cent on a machine whose speed drifts by 10-40 %. So each figure that a target bounds also comes
measured directly, where the noise of the shared work cancels: ``traced_over_untraced_from_tracer_work``
(1 + the tracer's own time in a traced step, hook and ``record`` timed inside it, over the untraced
step) and ``fttp_over_bare_from_overheads`` (each step's time outside the model's forward, backward
and the optimizer step, :class:`CoreTimer`, the loop's against the bare step's).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from knowtrace_overhead import schedule  # untraced/traced pairs in seeded random order

MIB = 2 ** 20
QWEN_VOCAB = 152064


# ----------------------------------------------------------------------------- measuring


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


class PeakMemory:
    """Peak memory since the last ``reset``, in bytes: CUDA's allocator statistics on a GPU, else the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs; Linux)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:  # free heap pages back to the system first (glibc keeps freed mid-size blocks resident), then
            # restart the peak from the resident set that is left
            _LIBC.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")

    def now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory on the CPU needs Linux)")


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # a step's kernels are done when its time is read
    return time.perf_counter()


class CoreTimer:
    """Seconds spent in ``model``'s forward, in backward and in optimizer steps (any optimizer), summed
    until ``read``: the work a loop step and a bare step share. The rest of a step is its own
    overhead, timed without the noise of the shared work."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.device, self.seconds, self._since = device, 0.0, None
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._stop),
                         register_optimizer_step_pre_hook(self._start), register_optimizer_step_post_hook(self._stop)]
        self._backward = torch.autograd.backward
        torch.autograd.backward = self._timed_backward  # Tensor.backward calls it

    def _start(self, *args) -> None:
        self._since = clock(self.device)

    def _stop(self, *args) -> None:  # returns None: a forward hook's value would replace the output
        self.seconds += clock(self.device) - self._since

    def _timed_backward(self, *args, **kwargs):
        self._start()
        try:
            return self._backward(*args, **kwargs)
        finally:
            self._stop()

    def read(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        torch.autograd.backward = self._backward


class SideBySide:
    """A loop callback: steps traced or not by ``traced`` (``set_traced(flag)`` prepares the next
    step, ``record(step, logs, state)`` is the tracer's work after a traced step), a ``bare`` step
    after every second loop step; per step its time and peak memory. Steps ``< warmup`` are not
    timed (nor the first bare step)."""

    def __init__(self, traced: list[bool], set_traced, record, bare, memory: PeakMemory, device, core: CoreTimer,
                 warmup: int = 2):
        self.traced, self.set_traced, self.record, self.bare = traced, set_traced, record, bare
        self.memory, self.device, self.core, self.warmup = memory, device, core, warmup
        self.rows = {"untraced": [], "traced": [], "bare": []}  # (seconds, peak bytes)
        self.overhead = {"untraced": [], "bare": []}  # seconds outside forward, backward and optimizer steps
        self.work: list[float] = []  # seconds of the tracer's own work in each timed traced step
        self.in_forward: list[float] = []  # the part of it inside the forward (timed hooks)
        self.hook_seconds: list[float] = []  # filled by a timed forward hook, when there is one
        self._start = None

    def on_step_end(self, step: int, logs: dict, state) -> None:
        seconds = clock(self.device) - self._start if self._start is not None else None
        core = self.core.read()
        if step >= self.warmup and not self.traced[step]:
            self.overhead["untraced"].append(seconds - core)
        if self.traced[step]:
            t = clock(self.device)
            self.record(step, logs, state)
            work = clock(self.device) - t + sum(self.hook_seconds)
            seconds = None if seconds is None else seconds + clock(self.device) - t
            if step >= self.warmup:
                self.work.append(work)
                self.in_forward.append(sum(self.hook_seconds))
        self.hook_seconds.clear()
        if step >= self.warmup:
            self.rows["traced" if self.traced[step] else "untraced"].append((seconds, self.memory.peak()))
        print(f"  (step {step + 1}/{len(self.traced)} {'traced' if self.traced[step] else 'untraced'}: "
              f"{'warm-up' if seconds is None or step < self.warmup else f'{seconds:.2f} s'})", file=sys.stderr, flush=True)
        if step % 2 == 1:  # after a pair (or the warm-up): one bare step, untraced
            self.set_traced(False)
            self.memory.reset()
            self.core.read()
            t = clock(self.device)
            self.bare()
            seconds = clock(self.device) - t
            if step > self.warmup:
                self.rows["bare"].append((seconds, self.memory.peak()))
                self.overhead["bare"].append(seconds - self.core.read())
        if step + 1 < len(self.traced):
            self.set_traced(self.traced[step + 1])
        self.memory.reset()
        self.core.read()
        self._start = clock(self.device)

    def median(self, kind: str) -> float:
        return statistics.median(s for s, _ in self.rows[kind])

    def peak(self, kind: str) -> int:
        return max(p for _, p in self.rows[kind])


def timed(fn, into: list):
    """``fn`` appending its wall time to ``into`` at every call."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t)

    return wrapper


def bare_step(params, loss_fn, device: torch.device, lr: float):
    """A plain PyTorch step: ``loss_fn()`` (forward and loss, under bf16 autocast on CUDA as the loop's
    default mixed precision there), backward, Adam on ``params``."""
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def report(prefix: str, sides: SideBySide, probe_seconds: list[float], probe_peak: int, map_bytes: int,
           transient_map_bytes: int | None = None) -> None:
    """The figures, one ``name: value`` line each."""
    untraced, traced, bare = sides.median("untraced"), sides.median("traced"), sides.median("bare")
    probe = statistics.median(probe_seconds)
    lines = {
        "seconds_per_step_untraced": f"{untraced:.3f}",
        "seconds_per_step_traced": f"{traced:.3f}",
        "seconds_per_step_bare": f"{bare:.3f}",
        "seconds_per_probe": f"{probe:.3f}",
        "tracer_work_seconds_per_step": f"{statistics.median(sides.work):.4f}",
        "tracer_work_in_forward_seconds_per_step": f"{statistics.median(sides.in_forward):.4f}  (hooks and captures "
                                                   f"inside the forward; the rest is after the step)",
        "traced_over_untraced": f"{traced / untraced:.4f}  (side by side; target <= 1.02)",
        "traced_over_untraced_from_tracer_work": f"{1 + statistics.median(sides.work) / untraced:.4f}  (target <= 1.02)",
        "probe_amortised_10_over_step": f"{1 + probe / 10 / untraced:.4f}  (target <= 1.10)",
        "fttp_over_bare": f"{untraced / bare:.4f}  (side by side; target <= 1.05)",
        "loop_overhead_seconds_per_step": f"{statistics.median(sides.overhead['untraced']):.4f}  (outside forward, "
                                          f"backward, optimizer step)",
        "bare_overhead_seconds_per_step": f"{statistics.median(sides.overhead['bare']):.4f}",
        "fttp_over_bare_from_overheads": f"{1 + (statistics.median(sides.overhead['untraced']) - statistics.median(sides.overhead['bare'])) / bare:.4f}  (target <= 1.05)",
        "peak_traced_over_untraced": f"{sides.peak('traced') / sides.peak('untraced'):.4f}  (target <= 1.05)",
        "peak_untraced_mib": f"{sides.peak('untraced') / MIB:.0f}",
        "peak_traced_mib": f"{sides.peak('traced') / MIB:.0f}",
        "peak_bare_mib": f"{sides.peak('bare') / MIB:.0f}",
        "peak_probe_mib": f"{probe_peak / MIB:.0f}",
        "attention_map_bytes": f"{map_bytes}",
        "steps_timed_per_variant": f"{len(sides.rows['untraced'])}",
    }
    if transient_map_bytes is not None:
        lines["attention_maps_held_during_probe_mib"] = f"{transient_map_bytes / MIB:.1f}"
    for name, value in lines.items():
        print(f"{prefix}_{name}: {value}", flush=True)


def saved_activations(model, layers, loss_fn) -> tuple[float, int]:
    """Bytes autograd keeps for the backward of ``loss_fn()`` (parameters excluded, each storage once):
    (mean per module of ``layers``, everything else). The activation memory of a deeper model of the
    same shapes is ``rest + depth x per layer``."""
    from collections import defaultdict

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    scope, sizes, seen = ["rest"], defaultdict(int), set()
    handles = []

    def leave(module, args, output) -> None:  # (a hook returning a value would replace the output)
        scope.pop()

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda module, args, i=i: scope.append(i)))
        handles.append(layer.register_forward_hook(leave))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            sizes[scope[-1]] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
    finally:
        for h in handles:
            h.remove()
    per_layer = [sizes[i] for i in range(len(layers))]
    return (statistics.mean(per_layer) if per_layer else 0.0), sizes["rest"]


def stored_map_bytes(trace_path: Path, variable: str = "xattn") -> int:
    """Bytes of one (step, sample) attention map as the trace stores it."""
    from knowtrace.store import open_trace

    ds = open_trace(trace_path)
    one = ds[variable].isel(step=0, sample=0)
    return int(one.size * one.dtype.itemsize)


# ----------------------------------------------------------------------------- MLLM


def llava_7b_shaped(full_depth: bool, dtype: torch.dtype):
    """(LlavaForConditionalGeneration, LlavaProcessor) of LLaVA-1.5-7B's shapes with random weights
    and the world tokenizer (ids < 32064)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from unlearn.world.tokenizer import build_processor

    processor = build_processor(336, 14)
    tok = processor.tokenizer
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24 if full_depth else 2,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32 if full_depth else 2, num_attention_heads=32, num_key_value_heads=32,
                                max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=576, vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with _default_dtype(dtype):  # built in the target dtype: a 7B model is never held in float32 first
        model = LlavaForConditionalGeneration(cfg)
    return model.eval(), processor


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.kept = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.kept)


def lengthened(adapter, records, seq: int):
    """The records with their questions prefixed by world sentences until the conversation is about
    ``seq`` tokens (image positions included), as a real prompt around LLaVA's 576 patches."""
    import dataclasses

    from unlearn.world.texts import world_corpus

    sentences, out = world_corpus(), []
    for r in records:
        question, i = r.question, 0
        while adapter.encode([dataclasses.replace(r, question=question)], cache=False)["input_ids"].shape[1] < seq:
            question = sentences[i % len(sentences)] + " " + question
            i += 1
        out.append(dataclasses.replace(r, question=question))
    return out


def mllm(args, device: torch.device, dtype: torch.dtype, tmp: Path) -> None:
    from knowtrace.logprobs import IGNORE_INDEX
    from unlearn.loop import TrainConfig, precision, run_loop
    from unlearn.methods import get_method
    from unlearn.methods.losses import signed_weights, weighted_token_loss
    from unlearn.models import adapter_for
    from unlearn.run_mllm import world_data
    from unlearn.tracing import start_tracer

    model, processor = llava_7b_shaped(args.full_depth, dtype)
    adapter = adapter_for(model.to(device), processor, name="llava-7b-shaped")
    concept, forget, _ = world_data(args.concept, 1, image_size=336)
    records = lengthened(adapter, [r for r in forget if r.image is not None][:args.batch], args.seq)
    probe_records = lengthened(adapter, [r for r in forget if r.image is not None][args.batch:2 * args.batch], args.seq)
    seq = adapter.encode(records)["input_ids"].shape[1]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"mllm_model: LLaVA-7B-shaped, {n_params / 1e6:.0f}M parameters, {model.config.text_config.num_hidden_layers} "
          f"decoder + {model.config.vision_config.num_hidden_layers} vision layers, {dtype}, {device}, batch "
          f"{args.batch} x {seq} tokens (576 image positions), LoRA, torch threads {torch.get_num_threads()}", flush=True)
    memory = PeakMemory(device)
    method = get_method("fttp")

    # the run's tracer (unlearn mllm --trace --trace-attention): log-probs + K on steps, attention probes
    # probes in the steps' precision (bf16 autocast on a GPU), as a run makes them
    tracer = start_tracer(adapter, tmp / "mllm.zarr", records, concept.names, {}, probe_records, attention=True,
                          precision=precision(TrainConfig(), device))
    probe, tracer.probe = tracer.probe, None  # the probe is timed apart (a run makes one after every step)
    pause = ExitStack()
    pause.enter_context(tracer.paused())
    hook_seconds: list[float] = []  # the log-prob hook's time inside traced forwards (attached after the pause)
    tracer.forwards._end = timed(tracer.forwards._end, hook_seconds)

    def set_traced(flag: bool) -> None:
        if flag:
            pause.close()
        elif tracer.attached:
            pause.enter_context(tracer.paused())

    enc = {k: v.to(device) for k, v in adapter.encode(records).items()}
    weights = signed_weights(adapter.concept_flags(records, concept.names), method.alpha, method.beta,
                             enc["labels"] != IGNORE_INDEX).to(device)
    bare = None

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return weighted_token_loss(adapter.model(**enc).logits, enc["labels"], weights)

    def run_bare():  # built on the first call: the loop has put LoRA on the model by then
        nonlocal bare
        if bare is None:
            bare = bare_step([p for p in adapter.model.parameters() if p.requires_grad], loss, device, lr=3e-4)
        bare()

    core = CoreTimer(model, device)
    sides = SideBySide([False, True] + schedule(args.repeats), set_traced, tracer.on_step_end, run_bare, memory,
                       device, core)
    sides.hook_seconds = hook_seconds
    cfg = TrainConfig(steps=len(sides.traced), batch_size=args.batch, lr=3e-4)
    try:
        try:
            run_loop(adapter, method, records, [], cfg, concept.key, concept.names, callbacks=[sides], progress=False)
        finally:
            core.close()
        pause.close()
        probe_seconds = []
        memory.reset()
        for i in range(args.probe_repeats):
            t = clock(device)
            probe.run(len(sides.traced) + i)
            probe_seconds.append(clock(device) - t)
        probe_peak = memory.peak()
    finally:
        pause.close()
        tracer.__exit__(None, None, None)
    report("mllm", sides, probe_seconds, probe_peak, stored_map_bytes(tmp / "mllm.zarr" / "probe"))
    # activation memory, for the memory a deeper model needs (README, "On your GPU")
    per_layer, rest = saved_activations(adapter.model, model.model.language_model.layers, loss)
    print(f"mllm_saved_activations_per_decoder_layer_mib: {per_layer / MIB:.1f}  (batch {args.batch}, {seq} tokens)")
    print(f"mllm_saved_activations_rest_mib: {rest / MIB:.1f}  (vision tower, projector, embeddings, logits, loss)")


# ----------------------------------------------------------------------------- SD


def sd_14_shaped(dtype: torch.dtype):
    """A StableDiffusionPipeline with SD-1.4's UNet and text encoder (random weights), a narrow VAE
    of SD-1.4's layout and the world's CLIP tokenizer at 77 tokens."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn.world.sd import build_tokenizer

    tokenizer = build_tokenizer(max_length=77)
    torch.manual_seed(0)
    with _default_dtype(dtype):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=512,
                            scaling_factor=0.18215)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)  # SD-1.4's config
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)  # SD-1.4's
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd(args, device: torch.device, dtype: torch.dtype, tmp: Path) -> None:
    from unlearn.loop import TrainConfig, precision, run_loop
    from unlearn.methods import get_method
    from unlearn.methods.losses import signed_weights
    from unlearn.models.sd import SDAdapter
    from unlearn.run_sd import SD_DEFAULTS
    from unlearn.sd_tracing import SDStepErrorCallback, SDTraceCallback
    from unlearn.world.concepts import BY_KEY
    from unlearn.world.records import world_sd_data

    train = args.sd_train if args.sd_train != "auto" else ("full" if device.type == "cuda" else "lora")
    pipe = sd_14_shaped(dtype).to(device)
    adapter = SDAdapter(pipe, name="sd-1.4-shaped")
    c = BY_KEY[args.sd_concept]
    forget, _ = world_sd_data(c.key, args.batch, adapter.resolution, n_retain=0, n_surrogate=0)
    method = get_method("fttp", modality="sd")
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"sd_model: SD-1.4 UNet, {n_params / 1e6:.0f}M parameters, {dtype}, {device}, batch {args.batch} x 4x64x64 "
          f"latents, trained: {'the full UNet (the toolkit default)' if train == 'full' else 'LoRA on attn1/attn2 q/k/v/out'}"
          f", torch threads {torch.get_num_threads()}", flush=True)
    memory = PeakMemory(device)
    # --trace-attention's probe (records step -1 now: creates its store, untimed); a run makes one every step
    probe = SDTraceCallback(adapter, forget, tmp / "sd-probe.zarr", attention=True, names=c.names,
                            precision=precision(TrainConfig(), device))
    # --trace-attention --trace-source step: the step's own errors, K and attention maps (paused in untraced steps)
    step_trace = SDStepErrorCallback(adapter, method, forget, tmp / "sd.zarr", attention=True, names=c.names)

    batch = adapter.encode(forget, masks=method.mask_options)
    weights = signed_weights(batch.mask, method.alpha, method.beta)
    generator = torch.Generator().manual_seed(1)
    bare = None

    def bare_loss():
        unet = adapter.model
        eps = torch.randn(batch.latents.shape, generator=generator).to(device, batch.latents.dtype)
        t = torch.randint(0, 1000, (len(forget),), generator=generator).to(device)
        z_t = adapter.noise_scheduler.add_noise(batch.latents, eps, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = adapter.predict(z_t, t, batch.cond, model=unet)  # the UNet's call with the prompts' conditioning
        err = (eps - pred).float().pow(2).mean(1)  # (B, h, w)
        return (weights * err).mean()

    def run_bare():
        nonlocal bare
        if bare is None:
            bare = bare_step([p for p in adapter.model.parameters() if p.requires_grad], bare_loss, device, lr=1e-5)
        bare()

    core = CoreTimer(pipe.unet, device)
    sides = SideBySide([False, True] + schedule(args.sd_repeats or args.repeats), lambda flag: step_trace.pause(not flag),
                       step_trace.on_step_end, run_bare, memory, device, core)
    step_trace.pause(True)  # the first (warm-up) step is untraced
    timed_capture_work(sides.hook_seconds)  # the probabilities computed beside each attn2 layer, in the forward
    cfg = TrainConfig(steps=len(sides.traced), batch_size=args.batch, lr=SD_DEFAULTS["lr"], lora=train == "lora")
    try:
        try:
            run_loop(adapter, method, forget, [], cfg, c.key, c.names, callbacks=[sides], progress=False)
        finally:
            core.close()
        step_trace.close()  # (its capture off the UNet: the probe attaches its own)
        held = watch_held_maps(probe.probe)
        probe_seconds = []
        memory.reset()
        for i in range(args.probe_repeats):
            t = clock(device)
            probe.record(len(sides.traced) + i, adapter.model, {})
            probe_seconds.append(clock(device) - t)
        probe_peak = memory.peak()
    finally:
        step_trace.close()
        probe.flush()
    report("sd", sides, probe_seconds, probe_peak, stored_map_bytes(tmp / "sd-probe.zarr"), transient_map_bytes=max(held))
    _, saved = saved_activations(adapter.model, [], bare_loss)
    print(f"sd_saved_activations_mib: {saved / MIB:.1f}  (batch {args.batch}; what autograd keeps for the backward)")


def timed_capture_work(into: list) -> None:
    """The attn2 capture's own work inside a forward (its probabilities beside the layer's attention, and
    keeping them) timed into ``into``, which the side-by-side callback adds to a traced step's tracer work."""
    from knowtrace import sd_attention

    sd_attention._attention_probs = timed(sd_attention._attention_probs, into)
    sd_attention.CrossAttentionCapture._record = timed(sd_attention.CrossAttentionCapture._record, into)


def watch_held_maps(sd_probe) -> list[int]:
    """A list that gets, at every probe, the bytes of the attn2 maps its capture holds before averaging
    them (every attn2 layer's head-mean maps of every (timestep, image) forward, on the CPU)."""
    held, mean_maps = [], sd_probe._mean_maps

    def measured(capture):
        held.append(sum(r.probs.numel() * r.probs.element_size() for r in capture.all()))
        return mean_maps(capture)

    sd_probe._mean_maps = measured
    return held


# ----------------------------------------------------------------------------- log-prob gather


def vocab(args, device: torch.device, dtype: torch.dtype) -> None:
    """token_logprobs on (1, seq, 152064) logits: the extra peak memory over the logits' size."""
    from knowtrace.logprobs import IGNORE_INDEX, token_logprobs

    memory = PeakMemory(device)
    torch.manual_seed(0)
    logits = torch.randn(1, args.seq, QWEN_VOCAB, device=device, dtype=dtype)
    size = logits.numel() * logits.element_size()
    full = args.seq * QWEN_VOCAB * 4  # a full float32 (seq x vocab) log-softmax
    print(f"vocab_logits_mib: {size / MIB:.0f}  ((1, {args.seq}, {QWEN_VOCAB}) {dtype}; a full float32 log-softmax "
          f"would be {full / MIB:.0f})")
    for scored in (20, args.seq):
        labels = torch.full((1, args.seq), IGNORE_INDEX, device=device)
        labels[0, args.seq - scored:] = torch.randint(0, QWEN_VOCAB, (scored,), device=device)
        memory.reset()
        before = memory.now()
        token_logprobs(logits, labels)
        extra = memory.peak() - before
        print(f"vocab_extra_peak_{scored}_scored_mib: {extra / MIB:.0f}  ({extra / full:.3f} of a full log-softmax, "
              f"{extra / size:.3f} of the logits; target < 1)")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", choices=("mllm", "sd", "vocab"), default=["vocab", "mllm", "sd"])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model and every input on it)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the models' weights")
    ap.add_argument("--full-depth", action="store_true", help="MLLM: 32 decoder and 24 vision layers (the real model)")
    ap.add_argument("--batch", type=int, default=1, help="records per step (the toolkit's default is 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps per variant (untraced, traced, bare)")
    ap.add_argument("--sd-repeats", type=int, default=1, help="SD: timed steps per variant (0: --repeats)")
    ap.add_argument("--probe-repeats", type=int, default=1, help="timed probes")
    ap.add_argument("--seq", type=int, default=650, help="MLLM tokens per record (576 of them image positions)")
    ap.add_argument("--sd-train", choices=("auto", "full", "lora"), default="auto",
                    help="SD's trained parts: full UNet (the toolkit default) or LoRA; auto: full on CUDA, else LoRA")
    ap.add_argument("--concept", default="oskel", help="world concept of the MLLM records")
    ap.add_argument("--sd-concept", default="vorn", help="world concept of the SD images")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.repeats < 1 or args.probe_repeats < 1 or args.batch < 1:
        raise SystemExit("--repeats, --probe-repeats and --batch must be >= 1")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if len(args.part) > 1:  # each part in a fresh process: its memory figures see no other part's leftovers
        for part in args.part:  # (a repeated --part overrides the first)
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part])
            if done.returncode != 0:
                raise SystemExit(f"part {part} failed (exit {done.returncode})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        part = args.part[0]
        start = time.perf_counter()
        if part == "vocab":
            vocab(args, device, dtype)
        else:
            {"mllm": mllm, "sd": sd}[part](args, device, dtype, Path(tmp))
        print(f"{part}_benchmark_seconds: {time.perf_counter() - start:.0f}", flush=True)

if __name__ == "__main__":
    main()
