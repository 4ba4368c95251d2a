"""The one contract of every knowtrace hook: attach, record, read, detach.

A capture is built on its model (it finds what to hook there once, so a bad option fails early and
attaching again costs nothing) and then

* :meth:`Capture.attach` installs its hooks. A model takes one capture of each kind at a time (a
  second is an error, the first stays intact); if installing fails halfway, what was installed is
  removed before the error propagates;
* records while attached (forward hooks, an attention function, attention processors);
* :meth:`Capture.read` returns what it recorded since the last read, and forgets it;
* :meth:`Capture.detach` removes every hook and restores what ``attach`` changed; idempotent; what
  was recorded stays readable. Used as a context manager (``with capture: ...``) it detaches also
  after an exception.

The log-prob hook (:mod:`knowtrace.logprobs`), MLLM attention (:mod:`knowtrace.mllm_attention`), SD
attention (:mod:`knowtrace.sd_attention`) and the SD prediction hook (:mod:`knowtrace.sd_tracer`) are
captures; tracers and the probe runner only attach, read and detach them.
"""

from __future__ import annotations


class Capture:
    """Subclasses install their hooks in ``_install`` (handles kept with :meth:`hook`), undo anything
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

    def hook(self, handle) -> None:
        """Keep a torch hook handle, removed on detach."""
        self._handles.append(handle)

    def _install(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def read(self):
        raise NotImplementedError
