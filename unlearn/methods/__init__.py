"""Unlearning methods, each a small registered module (see :mod:`.base`); MLLM and SD side by side."""

from . import fttp, ga, ga_kl, graddiff, mmunlearner, npo, po, sauce, siu  # noqa: F401  (registration, MLLM)
from . import sd_esd, sd_fmn, sd_fttp, sd_ga, sd_sa, sd_salun  # noqa: F401  (registration, SD)
from .base import (METHODS, SD_METHODS, Method, MLLMMethod, SDMethod, StepContext, StepOutput, get_method,
                   method_options, methods_of, register)

__all__ = ["METHODS", "SD_METHODS", "Method", "MLLMMethod", "SDMethod", "StepContext", "StepOutput", "get_method",
           "method_options", "methods_of", "register"]
