"""The one contract of every knowtrace hook: attach, record, read, detach.

A capture is built on its model (it finds what to hook there once: a bad option fails early) and

* ``attach()`` installs its hooks; one capture of a kind per model at a time (a second is an error,
  the first stays intact); if installing fails halfway, what was installed is removed;
* records while attached; ``read()`` returns what it recorded since the last read and forgets it;
* ``detach()`` removes every hook and restores what ``attach`` changed (idempotent; the records stay
  readable). ``with capture:`` detaches also after an exception.

Captures: the log-prob hook (:mod:`.logprobs`), MLLM attention (:mod:`.mllm_attention`), SD attention
(:mod:`.sd_attention`), the SD prediction hook (:mod:`.sd_tracer`). Tracers and the probe runner only
attach, read and detach them.
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
