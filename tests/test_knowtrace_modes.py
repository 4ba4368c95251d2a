"""eval_mode: a probe's eval mode by flags, each module's own flag restored, also after an exception."""

import pytest
import torch

from knowtrace.modes import eval_mode


def test_eval_mode_turns_dropout_off_and_restores_every_flag_after_an_exception():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout(0.5)))
    model.train()
    model[2].eval()  # a submodule deliberately in eval mode
    x = torch.ones(2, 4)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        torch.testing.assert_close(model(x), model[0](x))  # dropout is the identity in eval mode
    assert model.training and model[1].training and not model[2].training and not model[2][0].training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and model[1].training and not model[2].training
