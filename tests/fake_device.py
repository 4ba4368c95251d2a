"""A fake accelerator for tests on a CPU-only machine: tensors that say they live on ``cuda:0`` while their
data stays on the CPU, so every computation is real (losses, gradients, updates) and a tensor that was never
moved to the model's device is caught the way CUDA would catch it.

Why not torch's own tools: ``FakeTensorMode`` with fake CUDA aborts the process inside embedding on a CPU-only
build, and a whole HF forward on the ``meta`` device computes nothing (it stops at an internal ``.item()``).

How it works:

* :class:`DeviceTensor` is a ``torch.Tensor`` subclass whose ``.device`` (and ``is_cuda``) report
  :data:`DEVICE`; its data is an ordinary CPU tensor.
* :class:`FakeDevice`, a ``TorchFunctionMode``, sees every torch call while it is active:
  - a factory call or ``.to(...)`` / ``.cuda()`` that names :data:`DEVICE` runs on the CPU and its result becomes a
    ``DeviceTensor`` (``.to(DEVICE)`` of a ``DeviceTensor`` is a no-op, as on a GPU); any op with a ``DeviceTensor``
    input returns ``DeviceTensor`` outputs (gradients included);
  - an op that mixes a ``DeviceTensor`` with a plain CPU tensor of one or more dimensions raises, as CUDA does
    ("Expected all tensors to be on the same device"); what CUDA allows is allowed: CPU 0-dim tensors, CPU
    indices into a device tensor, a device scalar as an index into a CPU tensor (a read), copies;
  - host reads of a ``DeviceTensor`` are counted in :attr:`FakeDevice.syncs` by kind: ``.item()``,
    ``.tolist()``, ``bool()``/``int()``/``float()``, ``.cpu()`` / ``.to("cpu")``, and the data-dependent shapes
    that make CUDA wait (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``); ``.numpy()``
    raises, as on CUDA.
  Reads made by the toolkit's own code (unlearn/, knowtrace/) are also counted by site in
  :attr:`FakeDevice.sites` (``toolkit``: their number), apart from those inside transformers or diffusers.
* ``with FakeDevice() as dev: model.to(DEVICE)`` puts a model there (parameters keep their identity; modules'
  parameters are swapped in place, ``torch.__future__.set_swap_module_params_on_conversion``, so a LoRA
  layer that peft moves to its base layer's device becomes a ``DeviceTensor`` parameter too).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("cuda", 0)
TOOLKIT = tuple(str(Path(__file__).resolve().parents[1] / d) for d in ("unlearn", "knowtrace"))
TRANSPARENT = (str(Path(__file__).resolve()), str(Path(torch.__file__).parent))  # frames a sync is not attributed to
Tensor = torch.Tensor

# host reads: a synchronisation of the device with the host
READS = {Tensor.item: "item", Tensor.tolist: "tolist", Tensor.__bool__: "bool", Tensor.__int__: "int",
         Tensor.__float__: "float", Tensor.__index__: "int", Tensor.cpu: "cpu"}
# output shapes that depend on the data: CUDA waits for the kernel before it can allocate the result
DATA_DEPENDENT = {torch.nonzero: "nonzero", Tensor.nonzero: "nonzero", torch.masked_select: "masked_select",
                  Tensor.masked_select: "masked_select", torch.unique: "unique", Tensor.unique: "unique",
                  torch.argwhere: "nonzero", Tensor.argwhere: "nonzero"}
# ops that accept tensors of another device (the copy is the op), or CPU indices into a device tensor
MIXING_ALLOWED = {Tensor.copy_, Tensor.__setitem__, torch.as_tensor, torch.tensor, Tensor.new_tensor,
                  torch._has_compatible_shallow_copy_type}


class DeviceTensor(Tensor):
    """A CPU tensor that reports :data:`DEVICE` (only :class:`FakeDevice` gives it behaviour)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # the mode does everything

    @property
    def device(self):
        return DEVICE

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False


def on_device(t) -> bool:
    return isinstance(t, DeviceTensor)


def _wrap(x):
    if isinstance(x, Tensor) and not isinstance(x, DeviceTensor):
        return x.as_subclass(DeviceTensor)
    return x


def _plain(x):
    return x.as_subclass(Tensor) if isinstance(x, DeviceTensor) else x


def _names_device(d) -> bool:
    if d is None or isinstance(d, Tensor):
        return False
    if isinstance(d, int):
        return DEVICE.type == "cuda"
    return torch.device(d).type == DEVICE.type


class FakeDevice(TorchFunctionMode):
    """The mode described in the module docstring; ``syncs`` counts host reads by kind."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()  # kind -> count, every host read of a device tensor
        self.sites: Counter = Counter()  # (kind, "path:line") -> count, the reads made by toolkit code

    def __enter__(self):
        self._swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_swap_module_params_on_conversion(self._swap)
        return super().__exit__(*exc)

    def count(self, kind: str) -> None:
        self.syncs[kind] += 1
        site = _caller()
        if site is not None:
            self.sites[kind, site] += 1

    @property
    def toolkit(self) -> int:
        """Host reads made by the toolkit's own code (not inside transformers, diffusers, peft, ...)."""
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.to or func is Tensor.cuda:
            return self._to(func, args, kwargs)
        if func is Tensor.numpy and on_device(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                            "host memory first.")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        inputs_on_device = any(map(on_device, tensors))
        if inputs_on_device:
            self._check_mixing(func, args, tensors)
            if func in READS and on_device(args[0]):
                self.count(READS[func])
            elif func in DATA_DEPENDENT or (func is Tensor.__getitem__ and _bool_index(args[1])):
                self.count(DATA_DEPENDENT.get(func, "bool index"))
        device_named = _names_device(kwargs.get("device"))
        if device_named:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*args, **kwargs)
        if func is Tensor.cpu:
            return _plain(out)
        if inputs_on_device or device_named:
            if func in READS:
                return out
            return tree_map(_wrap, out)
        return out

    def _check_mixing(self, func, args, tensors) -> None:
        if func in MIXING_ALLOWED or getattr(func, "__name__", "") in ("__get__", "__set__"):  # attributes
            return
        if func is Tensor.__getitem__ and on_device(args[0]):
            return  # CPU indices into a device tensor: allowed on CUDA
        if func is Tensor.__getitem__ and all(t.dim() == 0 for t in tensors[1:] if on_device(t)):
            self.count("int")  # a device scalar as an index into a CPU tensor: CUDA reads it (diffusers' schedulers)
            return
        plain = [t for t in tensors if not on_device(t) and t.dim() > 0]
        if plain:
            name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{DEVICE} and cpu! ({name}: a CPU tensor of shape {tuple(plain[0].shape)})")

    def _to(self, func, args, kwargs):
        t, rest, kwargs = args[0], list(args[1:]), dict(kwargs)
        copy = kwargs.pop("copy", False)
        if func is Tensor.cuda:
            target, dtype, non_blocking, memory_format = DEVICE, None, kwargs.get("non_blocking", False), None
        elif rest and isinstance(rest[0], Tensor):  # .to(other): its device and dtype
            target, dtype = rest[0].device, rest[0].dtype
            non_blocking, memory_format = (rest[1:2] or [kwargs.get("non_blocking", False)])[0], None
        else:
            target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
        to_device = _names_device(target)
        to_cpu = target is not None and not to_device and torch.device(target).type == "cpu"
        if target is not None and not (to_device or to_cpu):
            raise RuntimeError(f"fake device test: .to({target!r}) is neither {DEVICE} nor the CPU")
        if on_device(t) and not to_cpu and (dtype is None or dtype == t.dtype) and not copy:
            return t  # already there: a no-op, as on a GPU
        options = {"dtype": dtype} if dtype is not None else {}
        if memory_format is not None:
            options["memory_format"] = memory_format
        out = Tensor.to(_plain(t), non_blocking=non_blocking, copy=copy, **options)
        if on_device(t) and to_cpu:
            self.count("cpu")
            return _plain(out)
        return _wrap(out) if to_device or (on_device(t) and target is None) else _plain(out)


def _caller() -> str | None:
    """"path:line" of the toolkit code that made a host read, or None when a library's code made it."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TRANSPARENT):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(TOOLKIT):
        return None
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_lineno}"


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)
