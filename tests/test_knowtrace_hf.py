"""knowtrace as an HF TrainerCallback: a real transformers.Trainer on a tiny LLaVA, one trace entry per step."""

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from knowtrace import trace
from knowtrace.hf import KnowtraceCallback
from knowtrace.store import open_trace
from tests.test_models import _records
from tests.tiny_models import tiny_llava
from unlearn.models import adapter_for
from unlearn.tracing import traced_samples


def _setup():
    model, processor = tiny_llava()
    adapter = adapter_for(model, processor)
    records = _records()
    items = [adapter.encode([r], cache=False) for r in records]  # one record per item, batch dim 1
    samples = traced_samples(adapter, records, ("Vorn",))
    for s, item in zip(samples, items):
        s.input_ids = item["input_ids"][0].tolist()
    return model, items, samples


def _args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=1,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             remove_unused_columns=False, logging_strategy="no", disable_tqdm=True)


def test_trainer_callback_records_one_entry_per_step(tmp_path):
    model, items, samples = _setup()
    with torch.no_grad():  # the starting model: step 1's trace must hold its log-probs
        start = [torch.log_softmax(model(**it).logits.double(), -1) for it in items]
    with trace(model, tmp_path / "t.zarr", samples) as tracer:
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=items, data_collator=lambda f: f[0],
                          callbacks=[KnowtraceCallback(tracer)])
        trainer.train()
    assert not model._forward_hooks and not model._forward_pre_hooks
    ds = open_trace(tmp_path / "t.zarr")
    assert list(ds.step.values) == [1, 2, 3]
    seen = ~np.isnan(ds.logprob.values).all(-1)  # (step, sample): exactly the one item of each step
    assert (seen.sum(1) == 1).all()
    first = int(np.flatnonzero(seen[0])[0])
    lab = items[first]["labels"][0]
    pos = (lab != -100).nonzero().squeeze(1)
    expected = start[first][0, pos - 1, lab[pos]].numpy()
    np.testing.assert_allclose(ds.logprob.values[0, first, : len(pos)], expected, atol=1e-5)
    assert np.isfinite(ds.K_N.values[seen]).all()
    assert list(ds.sample_id.values) == [s.id for s in samples]


def test_callback_needs_an_attached_tracer(tmp_path):
    model, items, samples = _setup()
    tracer = trace(model, tmp_path / "t.zarr", samples)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=items, data_collator=lambda f: f[0],
                      callbacks=[KnowtraceCallback(tracer)])
    with pytest.raises(RuntimeError, match="inside `with tracer:`"):
        trainer.train()
