"""Benchmark: one FTTP step of the unlearning loop vs a hand-written bare PyTorch step
(forward + weighted token loss + backward + Adam) on the same model (world MLLM + LoRA) and batch.
Target: ratio <= 1.10. Both are timed in this one run, interleaved step by step (the machine is noisy), median over repeats.

    python benchmarks/mllm_step_speed.py [--repeats 30] [--world-dir DIR] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from knowtrace.logprobs import IGNORE_INDEX
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.methods.losses import signed_weights, weighted_token_loss
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data
from unlearn.world.source import resolve_model


class InterleavedTimer:
    """A loop callback: times each loop step (end of one callback to the next) and, inside the
    callback, one bare step on a separate copy of the model, so that both kinds of step alternate
    and share the machine's load (this machine is noisy)."""

    def __init__(self, bare_step):
        self.bare_step, self.loop_times, self.bare_times, self.last = bare_step, [], [], None

    def on_step_end(self, step, logs, state):
        now = time.perf_counter()
        if self.last is not None:
            self.loop_times.append(now - self.last)
        start = time.perf_counter()
        self.bare_step()
        self.bare_times.append(time.perf_counter() - start)
        self.last = time.perf_counter()


def bare_step_on_copy(adapter, batch_records, concept, full: bool):
    """A hand-written step (forward, weighted token loss, backward, Adam) on a copy of the model with
    the same trainable parameters as the loop's, inputs and weights prepared once."""
    import copy

    from unlearn.loop import apply_lora

    model = copy.deepcopy(adapter.model)
    if full:
        model.requires_grad_(True)
    else:
        model = apply_lora(model, 8, 16, adapter.lora_targets)
    fttp = get_method("fttp")
    return bare_fttp_step(model, adapter, batch_records, concept.names, fttp.alpha, fttp.beta, lr=3e-4)


def bare_fttp_step(model, adapter, records, names, alpha: float, beta: float, lr: float):
    """A bare PyTorch FTTP step on ``model`` (forward, signed-weight token loss, backward, Adam) over the
    fixed batch of ``records``, inputs and weights prepared once; the step returns its loss."""
    model.train()
    enc = adapter.encode(records)
    weights = signed_weights(adapter.concept_flags(records, names), alpha, beta, enc["labels"] != IGNORE_INDEX)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        loss = weighted_token_loss(model(**enc).logits, enc["labels"], weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--world-dir")
    ap.add_argument("--concept", default="oskel")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = load_mllm(resolve_model("world", "mllm", args.world_dir))
    size = adapter.processor.image_processor.crop_size["height"]
    concept, forget, _ = world_data(args.concept, 1, image_size=size)
    batch_records = forget[:2]  # the paper's batch size; one batch repeated so both sides see the same input
    timer = InterleavedTimer(bare_step_on_copy(adapter, batch_records, concept, args.full))
    cfg = TrainConfig(steps=args.repeats + 1, lora=not args.full)
    run_loop(adapter, get_method("fttp"), batch_records, [], cfg, concept.key, concept.names, callbacks=[timer],
             progress=False)
    loop_med, bare_med = statistics.median(timer.loop_times), statistics.median(timer.bare_times[1:])
    print(f"model: world MLLM ({'full fine-tuning' if args.full else 'LoRA'}), batch {len(batch_records)}, "
          f"{args.repeats} steps each, interleaved, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch step: median {bare_med * 1000:.1f} ms")
    print(f"FTTP loop step:    median {loop_med * 1000:.1f} ms")
    print(f"ratio FTTP / bare: {loop_med / bare_med:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
