"""Benchmark: what knowtrace's tracing costs a training step, measured in one run.

How it is measured, and why. This machine's speed drifts by 20-40 % over tenths of a second (other
tenants, frequency), more than the effects measured. Untraced and traced steps therefore alternate
step by step on the same model and batch, in pairs whose order is drawn at random (seeded), so drift
and the after-effects of a step (cold caches after a probe, a background write) fall on both sides
alike. Amortised costs (a probe every 10 traced steps) are ratios of TOTALS over all pairs (a
median would skip the probe steps); per-step costs also as ratios of medians. The first traced step
creates the trace store (one-time xarray/zarr set-up): its pair is left out and its time printed.

World MLLM (``load_mllm(resolve_model("world", "mllm"))``, cached default world) with LoRA, FTTP's weighted token loss,
batch 2, Adam:

1. log-probs + K_C/K_N: traced steps record (forward hook, chunked log-probs, K, buffered Zarr
   append, ``flush_seconds=5``, written by a background thread, counted). Target <= 1.03.
2. + attention probes every 10 steps: traced steps as in 1., and after every 10th traced step a probe
   set of 2 records (the training batch's size) runs under inference mode with the cross-attention
   of 2 layers (``AttentionOptions(on_steps=False)``: training steps keep the original attention).
   Target <= 1.10, amortised.
3. peak memory: peak RSS of the process (VmHWM, reset through /proc/self/clear_refs before each step)
   during untraced vs traced steps of 2.: the ratio of the peaks. Target <= 1.10. (RSS, not
   tracemalloc: tracemalloc does not see torch's tensor allocations.)

World SD (:func:`sd`): FTTP through the unlearn loop with the callbacks `unlearn sd --trace` uses,
each step traced or not by a schedule of the same kind: 1. K per step from each step's own errors
(``--trace-source step``), target <= 1.03; 2. + a fixed-noise probe with cross-attention maps
(``--trace-attention``) of 2 images after every 10th traced step, target <= 1.10; 3. peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/knowtrace_overhead.py [--pairs 200] [--sd-pairs 120]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from knowtrace import AttentionOptions, ProbeSet, trace
from mllm_step_speed import bare_fttp_step
from unlearn.loop import apply_lora
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data
from unlearn.tracing import traced_samples
from unlearn.world.source import resolve_model

MIB = 2 ** 20


def peak_rss_reset() -> int:
    """Reset the process's peak RSS (Linux) and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def schedule(pairs: int, seed: int = 0) -> list[bool]:
    """Which steps are traced: ``pairs`` pairs of one untraced and one traced step, each pair's order
    drawn at random."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs):
        first = rng.random() < 0.5
        out += [first, not first]
    return out


class Timings:
    """Per-step wall times and peak RSS, split by traced/untraced; the first traced step's pair apart."""

    def __init__(self, traced: list[bool]):
        self.traced = traced
        self.times: list[float] = []
        self.peaks: list[int] = []

    def add(self, seconds: float, peak: int) -> None:
        self.times.append(seconds)
        self.peaks.append(peak)

    def split(self, what: list):
        """(untraced, traced) values of the pairs after the first (whose traced step creates the store)."""
        plain = [v for v, t in zip(what[2:], self.traced[2:]) if not t]
        traced = [v for v, t in zip(what[2:], self.traced[2:]) if t]
        return plain, traced

    def first_traced(self) -> float:
        return self.times[self.traced.index(True)]

    def report(self, label: str, target: float, amortised: bool) -> None:
        plain, traced = self.split(self.times)
        med = statistics.median(traced) / statistics.median(plain)
        total = sum(traced) / sum(plain)
        main = f"{total:.3f} of totals, {med:.3f} of medians" if amortised else \
            f"{med:.3f} of medians, {total:.3f} of totals"
        print(f"  ratio {label + ':':<44} {main}  (target <= {target:.2f}{', amortised' if amortised else ''})")

    def report_memory(self) -> None:
        plain, traced = self.split(self.peaks)
        print(f"  peak RSS untraced {max(plain) / MIB:.1f} MiB, traced {max(traced) / MIB:.1f} MiB")
        print(f"  ratio {'peak memory (RSS):':<44} {max(traced) / max(plain):.3f}  (target <= 1.10)")


def run_schedule(tracer, step, ids, pairs: int, seed: int) -> tuple[Timings, list[float]]:
    """``step()`` by the schedule; traced steps record the batch ``ids`` (and probe when due) inside the tracer.
    Returns the timings and the probe runs' seconds."""
    timings, probe_seconds, counter = Timings(schedule(pairs, seed)), [], 0
    if tracer.probe is not None:  # time the probe runs that record() makes
        run_probe = tracer.probe.run

        def timed_probe(at: int) -> None:
            t = time.perf_counter()
            run_probe(at)
            probe_seconds.append(time.perf_counter() - t)

        tracer.probe.run = timed_probe
    with tracer:
        for traced in timings.traced:
            peak_rss_reset()
            if not traced:
                with tracer.paused():  # untraced: no hooks, original attention
                    t = time.perf_counter()
                    step()
                    timings.add(time.perf_counter() - t, _status("VmHWM"))
                continue
            t = time.perf_counter()
            loss = step()
            tracer.record(counter, ids, {"loss_forget": loss.item()})  # probes run when counter % 10 == 0
            timings.add(time.perf_counter() - t, _status("VmHWM"))
            counter += 1
    return timings, probe_seconds


def report(setting: str, pairs: int, one: Timings, per_step: str, two: Timings, probe: str,
           probe_seconds: list[float]) -> None:
    """Print measurement 1 (per-step tracing, ``per_step``), 2 (+ probes every 10 steps) and 3 (RSS)."""
    plain, traced = one.split(one.times)
    print(f"{setting}: {pairs} pairs of an untraced and a traced step, in random order, per measurement")
    print(f"  untraced step median {statistics.median(plain) * 1e3:.1f} ms; traced ({per_step}) "
          f"{statistics.median(traced) * 1e3:.1f} ms; first traced step (creates the store) {one.first_traced() * 1e3:.0f} ms")
    one.report(per_step, 1.03, amortised=False)
    print(f"  one probe ({probe}) median {statistics.median(probe_seconds) * 1e3:.1f} ms, {len(probe_seconds)} probes")
    two.report("+ attention probes every 10 steps", 1.10, amortised=True)
    two.report_memory()


def world_fttp_step(concept_key: str):
    """(adapter, concept, forget records, base model, step): the world MLLM with LoRA and a bare FTTP step (batch: the
    first 2 forget records; ``step()`` returns the loss); hooks go on the base model."""
    torch.manual_seed(0)
    adapter = load_mllm(resolve_model("world", "mllm"))
    size = adapter.processor.image_processor.crop_size["height"]
    concept, forget, _ = world_data(concept_key, 1, image_size=size)
    model = apply_lora(adapter.model, 8, 16, adapter.lora_targets)
    base = adapter.model  # peft injects LoRA in place: hooks on the base model see the trained model
    return adapter, concept, forget, base, bare_fttp_step(model, adapter, forget[:2], concept.names, 1.0, 1.0, lr=1e-5)


def mllm(args, tmp: Path) -> None:
    adapter, concept, forget, base, step = world_fttp_step(args.concept)
    records = forget[:2]
    samples = traced_samples(adapter, forget, concept.names)
    ids = [r.id for r in records]
    probe_records = forget[2:4]  # a probe set the size of a training batch
    probes = ProbeSet([adapter.encode(probe_records)], traced_samples(adapter, probe_records, concept.names), every=10)
    n_layers = base.config.get_text_config().num_hidden_layers

    for _ in range(3):  # warm-up
        step()

    # 1. per-step log-probs + K
    one, _ = run_schedule(trace(base, tmp / "mllm.zarr", samples), step, ids, args.pairs, 1)
    # 2. + attention probes every 10 traced steps, amortised; 3. peak RSS
    two, probe_seconds = run_schedule(trace(base, tmp / "mllm_probe.zarr", samples, probes=probes,
                                            attention=AttentionOptions(layers=(0, n_layers - 1), on_steps=False)),
                                      step, ids, args.pairs, 2)
    report(f"world MLLM + LoRA, batch 2, torch threads {torch.get_num_threads()}", args.pairs, one, "log-probs + K",
           two, "2 records, attention of 2 layers", probe_seconds[1:])  # the first probe creates its group


class _SDSchedule:
    """Loop callback for the SD measurement: the step's wall time runs from the end of the previous
    step's callbacks to the end of its own (tracing included); traced steps (by ``timings.traced``)
    run the step-error tracer, and the probe after every ``every``-th traced step."""

    def __init__(self, traced: list[bool], step_cb, probe_cb=None, every: int = 10):
        self.traced, self.step_cb, self.probe_cb, self.every = traced, step_cb, probe_cb, every
        self.timings = Timings(traced[1:])  # step 0 is a warm-up: it has no start time
        self.probe_seconds: list[float] = []
        self.counter = 0
        self._last = None

    def on_step_end(self, step: int, logs: dict, state) -> None:
        if self.traced[step]:
            self.step_cb.on_step_end(step, logs, state)
            if self.probe_cb is not None and self.counter % self.every == 0:
                t = time.perf_counter()
                self.probe_cb.record(step, state.model, logs)
                self.probe_seconds.append(time.perf_counter() - t)
            self.counter += 1
        now = time.perf_counter()
        if self._last is not None:  # step 0 has no start: it is a warm-up
            self.timings.add(now - self._last, _status("VmHWM"))
        self._last = time.perf_counter()
        peak_rss_reset()


def sd(args, tmp: Path) -> None:
    """World SD: FTTP through the unlearn loop (full fine-tuning, batch 2; lr 1e-6, as cost does not
    depend on it and hundreds of FTTP steps at the world's 3e-5 drive the model off), with the
    callbacks `unlearn sd --trace` uses: ``SDStepErrorCallback`` (each step's own errors, no extra
    forward: `--trace-source step`) and ``SDTraceCallback(attention=True)`` (fixed-noise probe, 5
    timesteps, with cross-attention maps: `--trace-attention`) on 2 forget images, the training
    batch's size."""
    from unlearn.loop import TrainConfig, run_loop
    from unlearn.methods import get_method
    from unlearn.models.sd import load_sd_adapter
    from unlearn.sd_tracing import SDStepErrorCallback, SDTraceCallback
    from unlearn.world.concepts import BY_KEY
    from unlearn.world.records import world_sd_data
    from unlearn.world.source import resolve_model

    c = BY_KEY[args.concept]
    torch.manual_seed(0)
    adapter = load_sd_adapter(resolve_model("world", "sd"))
    forget, _ = world_sd_data(c.key, 5, adapter.resolution)
    method = get_method("fttp", modality="sd")

    def run(name: str, probe: bool, seed: int) -> tuple[Timings, list[float]]:
        traced = [False] + schedule(args.sd_pairs, seed)  # step 0: warm-up, not timed
        step_cb = SDStepErrorCallback(adapter, method, forget, tmp / f"{name}.zarr")
        probe_cb = SDTraceCallback(adapter, forget[:2], tmp / f"{name}-probe.zarr", attention=True,
                                   names=c.names) if probe else None  # probes step -1 now: outside the timing
        callback = _SDSchedule(traced, step_cb, probe_cb)
        try:
            cfg = TrainConfig(steps=len(traced), lr=1e-6, lora=False, batch_size=2)
            run_loop(adapter, method, forget, [], cfg, c.key, c.names, callbacks=[callback], progress=False)
        finally:
            step_cb.flush()
            if probe_cb is not None:
                probe_cb.flush()
        return callback.timings, callback.probe_seconds

    one, _ = run("sd-steps", False, 1)
    two, probe_seconds = run("sd-probe", True, 2)
    report(f"world SD, the unlearn loop: FTTP, full fine-tuning, batch 2, torch threads {torch.get_num_threads()}",
           args.sd_pairs, one, "K (--trace-source step)", two, "2 images x 5 timesteps, attn2 maps", probe_seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="MLLM: untraced/traced step pairs per measurement")
    ap.add_argument("--sd-pairs", type=int, default=120, help="SD: untraced/traced step pairs per measurement")
    ap.add_argument("--concept", default="oskel")
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-mllm", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_mllm:
            mllm(args, Path(tmp))
        if not args.skip_sd:
            sd(args, Path(tmp))


if __name__ == "__main__":
    main()
