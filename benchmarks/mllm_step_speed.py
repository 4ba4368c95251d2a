"""Benchmark: one FTTP step of the unlearning loop vs a hand-written bare PyTorch step
(forward + weighted token loss + backward + Adam) on the same model (world MLLM + LoRA) and batch.
Target: ratio <= 1.10. Both are timed in this one run, one after the other, median over repeats.

    python benchmarks/mllm_step_speed.py [--repeats 30] [--world-dir DIR] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn.data.token_weights import token_weights
from unlearn.loop import TrainConfig, run_loop
from unlearn.methods import get_method
from unlearn.methods.losses import weighted_token_loss
from unlearn.models import load_mllm
from unlearn.run_mllm import world_data


class StepTimer:
    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, step, logs, state):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--world-dir")
    ap.add_argument("--concept", default="oskel")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = load_mllm("world", world_dir=args.world_dir)
    size = adapter.processor.image_processor.crop_size["height"]
    concept, forget, _ = world_data(args.concept, 1, image_size=size)
    batch_records = forget[:2]  # the paper's batch size; one batch repeated so both sides see the same input

    # the loop: FTTP for `repeats` steps on the same two records (a one-batch forget set)
    timer = StepTimer()
    cfg = TrainConfig(steps=args.repeats + 1, lora=not args.full)
    run_loop(adapter, get_method("fttp"), batch_records, [], cfg, concept.key, concept.names, callbacks=[timer],
             progress=False)
    loop_times = timer.times

    # bare PyTorch on the same (now LoRA-wrapped) model: inputs and weights prepared once, outside timing
    model = adapter.model
    model.train()
    enc = adapter.encode(batch_records)
    weights, _ = token_weights(adapter.tokenizer, enc["labels"], concept.names, 1.0, 1.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    bare_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        loss = weighted_token_loss(model(**enc).logits, enc["labels"], weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bare_times.append(time.perf_counter() - start)
    loop_med, bare_med = statistics.median(loop_times), statistics.median(bare_times)
    print(f"model: world MLLM ({'full fine-tuning' if args.full else 'LoRA'}), batch {len(batch_records)}, "
          f"{args.repeats} steps each, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch step: median {bare_med * 1000:.1f} ms")
    print(f"FTTP loop step:    median {loop_med * 1000:.1f} ms")
    print(f"ratio FTTP / bare: {loop_med / bare_med:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
