"""The one contract of every knowtrace hook: attach, record, read, detach.

A capture is built on its model (finding what to hook there once, so a bad option fails early);
``attach()`` installs its hooks (one capture of a kind per model; a failed install is undone), it
records while attached, ``read()`` returns and forgets what it recorded, ``detach()`` restores what
``attach`` changed (idempotent; ``with capture:`` detaches after an exception too). Captures: the
log-prob hook (:mod:`.logprobs`), MLLM and SD attention, the SD prediction hook (:mod:`.sd_tracer`).
"""

from __future__ import annotations


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
