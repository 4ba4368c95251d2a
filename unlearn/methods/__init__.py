"""Unlearning methods, each a small registered module (see :mod:`.base`)."""

from . import fttp, ga, ga_kl, graddiff, mmunlearner, npo, po, siu  # noqa: F401  (registration)
from .base import METHODS, MLLMMethod, StepContext, get_method, method_options, register

__all__ = ["METHODS", "MLLMMethod", "StepContext", "get_method", "method_options", "register"]
