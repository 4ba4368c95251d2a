"""MLLM evaluation (paper Appendix C, on the world or a user-given evaluation set).

* efficacy: share (%) of answers on the training image(s) that do not identify the concept;
* em (generality): the same on unseen images, over prompts that never name the concept and yes/no
  prompts about it ("no" counts as forgotten); ``em_identify`` and ``em_yesno`` separately;
* specificity: share (%) of retain records (other concepts' identification and text-only facts on
  the world) whose expected answer appears in the generated one (case and punctuation ignored);
* diversity: unique words / all words (%) over every answer generated for em and specificity;
* K_C, K_N: Eq. 3 and 5 on the forget answers, teacher-forced, mean over records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from knowtrace import mllm_knowledge, token_logprobs
from knowtrace.modes import eval_mode

from ..data.names import names_in
from ..data.records import Record


@dataclass
class MLLMEvalSet:
    efficacy: list[Record]  # questions on the training image(s)
    test: list[Record]  # questions on unseen images of the concept
    retain: list[Record]  # other knowledge, with expected answers
    forget: list[Record]  # the forget answers (for K_C / K_N)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def forgotten(answer: str, record: Record, names) -> bool:
    if record.qtype == "yesno":
        return not answer.strip().lower().startswith("yes")
    return not names_in(answer, names)


def answers_match(generated: str, expected: str) -> bool:
    g, e = " ".join(_words(generated)), " ".join(_words(expected))
    return bool(e) and f" {e} " in f" {g} "


def diversity(answers: list[str]) -> float:
    words = [w for a in answers for w in _words(a)]
    return 100.0 * len(set(words)) / len(words) if words else 0.0


def pct(flags) -> float | None:
    """Percentage of true flags; None (not measured, written as null) when there are none, e.g. a record
    directory whose test questions include no yes/no question: no score, not a failed one."""
    return round(100.0 * float(np.mean(flags)), 2) if len(flags) else None


@torch.no_grad()
def knowledge(adapter, records: list[Record], names, batch_size: int = 8) -> tuple[float, float]:
    """Mean K_C, K_N over the records' answers (teacher-forced)."""
    k_c, k_n = [], []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        batch = adapter.encode(chunk, train=True)
        logp = token_logprobs(adapter.model(**batch).logits, batch["labels"])
        c, n = torch.stack(mllm_knowledge(logp, adapter.concept_flags(chunk, names, allow_missing=True))).tolist()
        k_c += c  # (read in one transfer)
        k_n += n
    return float(np.mean(k_c)), float(np.mean(k_n))


def evaluate(adapter, evalset: MLLMEvalSet, names, max_new_tokens: int = 32, samples: int = 8) -> dict:
    """All MLLM metrics (percentages 0-100), plus a few generated samples."""
    with eval_mode(adapter.model):
        eff, test, ret = (adapter.generate(records, max_new_tokens)
                          for records in (evalset.efficacy, evalset.test, evalset.retain))
        k_c, k_n = knowledge(adapter, evalset.forget, names)
    f_test = [forgotten(a, r, names) for a, r in zip(test, evalset.test)]
    metrics = {
        "efficacy": pct([forgotten(a, r, names) for a, r in zip(eff, evalset.efficacy)]),
        "em": pct(f_test),
        "em_identify": pct([f for f, r in zip(f_test, evalset.test) if r.qtype != "yesno"]),
        "em_yesno": pct([f for f, r in zip(f_test, evalset.test) if r.qtype == "yesno"]),
        "specificity": pct([answers_match(a, r.answer) for a, r in zip(ret, evalset.retain)]),
        "diversity": round(diversity(test + ret), 2),
        "K_C": k_c,
        "K_N": k_n,
    }
    pick = np.linspace(0, len(test) - 1, num=min(samples, len(test))).astype(int) if test else []
    metrics["samples"] = [{"id": evalset.test[i].id, "question": evalset.test[i].question, "answer": test[i]}
                          for i in pick]
    return metrics
