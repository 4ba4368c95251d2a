"""The one contract of every knowtrace hook: attach, record, read, detach.

A capture is built on its model (finding what to hook there once, so a bad option fails early);
``attach()`` installs its hooks (one capture of a kind per model; a failed install is undone), it
records while attached, ``read()`` returns and forgets what it recorded, ``detach()`` restores what
``attach`` changed (idempotent; ``with capture:`` detaches after an exception too). Captures: the
log-prob hook (:mod:`.logprobs`), MLLM and SD attention, the SD prediction hook (:mod:`.sd_tracer`).
"""

from __future__ import annotations

import torch


class Capture:
    """Subclasses install hooks in ``_install`` (torch hook handles kept in ``_handles``), undo anything
    else in ``_remove`` (calling this one's) and return their records from ``read``."""

    def __init__(self, model):
        self.model = model
        self.attached = False
        self._handles = []
        self._claim = f"_knowtrace_{type(self).__name__}"  # attribute marking the model while attached

    def attach(self):
        if getattr(self.model, self._claim, None) is not None:
            raise RuntimeError(f"a knowtrace {type(self).__name__} is already attached to this model; detach it "
                               f"(leave its `with` block) first")
        setattr(self.model, self._claim, self)
        self.attached = True
        try:
            self._install()
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        if not self.attached:
            return
        try:
            self._remove()
        finally:
            self.attached = False
            if getattr(self.model, self._claim, None) is self:
                delattr(self.model, self._claim)

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    def _install(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def read(self):
        raise NotImplementedError


def host_copies(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """CPU copies of small tensors in one device-to-host transfer (one synchronisation, not one per tensor):
    flattened into float64 (exact for float32 / bf16 values, bools and integers below 2**53, e.g. token ids),
    read, and split back into each tensor's dtype and shape. None stays None."""
    present = [t.detach() for t in tensors if t is not None]
    device = next((t.device for t in present if t.device.type != "cpu"), None)
    if device is None:
        flat = present  # already there: no copy
    else:  # (a CPU tensor among them goes along)
        one = torch.cat([t.reshape(-1).to(device, torch.float64) for t in present]).cpu()
        flat = [p.to(t.dtype).view(t.shape) for p, t in zip(one.split([t.numel() for t in present]), present)]
    it = iter(flat)
    return [None if t is None else next(it) for t in tensors]
