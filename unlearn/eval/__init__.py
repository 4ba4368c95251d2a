"""Evaluation of unlearned models: MLLMs (EM / generality, efficacy, specificity, diversity, K_C/K_N)."""
