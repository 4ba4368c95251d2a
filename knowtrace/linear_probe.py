"""Linear probes: multinomial logistic regression on hidden states, in torch.

Features are standardised with the training set's mean and standard deviation; the weights minimise the
mean cross-entropy plus ``l2 / 2 * |W|^2`` (the bias is not penalised), by full-batch L-BFGS with a
strong-Wolfe line search in float64. The problem is convex, so the fit hardly depends on the start; the
start is drawn from ``seed`` (small normal weights), which makes a fit reproducible bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearProbe:
    mean: torch.Tensor  # (d,) standardisation of the features
    std: torch.Tensor  # (d,)
    weight: torch.Tensor  # (C, d), on standardised features
    bias: torch.Tensor  # (C,)
    classes: torch.Tensor  # (C,) the label of each output

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return ((X.double() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(n,) the predicted labels of X (n, d)."""
        return self.classes[self.logits(X).argmax(1)]

    def accuracy(self, X: torch.Tensor, y) -> float:
        """Fraction of rows of X whose predicted label is y (a tensor of labels, or one label for all)."""
        y = torch.as_tensor(y)
        return float((self.predict(X) == y).double().mean())


def fit_probe(X: torch.Tensor, y, seed: int = 0, l2: float = 1e-2, max_iter: int = 100) -> LinearProbe:
    """A probe predicting the labels ``y`` (n,) ints from features ``X`` (n, d); at least two classes."""
    X, y = X.detach().double().cpu(), torch.as_tensor(y).cpu()
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"fit_probe needs X (n, d) and y (n,), got {tuple(X.shape)} and {tuple(y.shape)}")
    classes, target = torch.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes among its labels, got only {classes.tolist()}")
    mean, std = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
    Z = (X - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(len(classes), X.shape[1], generator=gen, dtype=torch.float64) * 1e-3).requires_grad_()
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ weight.T + bias, target) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach(), classes)


def probe_layers(states: torch.Tensor, y, seed: int = 0, **fit) -> list[LinearProbe]:
    """One probe per layer of ``states`` (L + 1, n, d), each fitted to the labels ``y`` (n,)."""
    return [fit_probe(layer, y, seed, **fit) for layer in states]
