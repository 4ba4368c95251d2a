"""The learning-rate schedule the world models train with."""

import math


def warmup_cosine(warmup: int, steps: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``.

    The warm-up is what lets the tiny world MLLM learn names at all (ENVIRONMENT.md: without it, it
    learned the answer template and stayed at chance on names)."""

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return at
