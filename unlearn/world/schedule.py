"""How the world models train: the learning-rate schedule and one optimizer step."""

import math

import torch


def warmup_cosine(warmup: int, steps: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``steps``.

    The warm-up is what lets the tiny world MLLM learn names at all (ENVIRONMENT.md: without it, it
    learned the answer template and stayed at chance on names)."""

    def at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return at


def optimizer_step(loss: torch.Tensor, opt, sched, what: str, step: int, bar, clip_params=None) -> None:
    """Backward, clip the gradient norm of ``clip_params`` to 1 (when given), step the optimizer and the
    schedule, show the loss on the progress ``bar`` every 20 steps; a non-finite loss stops the build (a
    diverged world model must not be cached)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} training diverged at step {step} (loss {loss.item()}); "
                                 "lower the learning rate or check the inputs")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
    if step % 20 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")
