"""The model registry: ``{name: factory}``; a factory builds a fresh network for a task sequence.

Contract: ``factory(input_shape, num_outputs, **options) -> nn.Module`` where ``input_shape`` is
one sample's shape as the tasks give it (``(1, 28, 28)`` for MNIST, ``(3, 32, 32)`` for RGB
images, ``(20,)`` for rows of 20 features), ``num_outputs`` the width of the output layer (all
heads of the scenario) and ``options`` the architecture settings the factory declares as keyword
arguments (the MLP: ``hidden``, ``dropout``, ``batchnorm``). The network maps a batch
``[N, *input_shape]`` to logits ``[N, num_outputs]``; its initial weights come from torch's global
random state (the loop seeds it), so the same seed builds the same network.

Built in: ``mlp`` (the paper's network), ``cnn`` (a small CNN for 28×28 images) and ``resnet18``
(the reduced ResNet-18 of GEM / A-GEM). Register a new one with :func:`register_model`; or name
any importable factory as ``"package.module:factory"`` (``--model`` takes that form too:
:func:`resolve_model` imports it from ``sys.path``, then the working directory); the library also
takes the factory itself (a function or class).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.checks import Constraint
from ewc.config import accepted_options

__all__ = [
    "MLP_HIDDEN",
    "MODELS",
    "ModelChoice",
    "ModelFactory",
    "ResNet",
    "build_model",
    "check_model",
    "check_outputs",
    "check_takes_dropout",
    "cnn",
    "image_shape",
    "make_mlp",
    "mlp",
    "model_name",
    "model_options",
    "register_model",
    "resnet18",
    "resolve_model",
]

ModelFactory = Callable[..., nn.Module]
#: the paper's MLP width (two hidden layers of 400), the default of ``mlp`` and of ``ewc run``
MLP_HIDDEN: tuple[int, ...] = (400, 400)
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory`` under ``name`` (a clear error for a name taken twice)."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS and MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        if ":" in name:
            raise ValueError(f"model name {name!r} must not contain ':' (that form names module:factory)")
        MODELS[name] = factory
        return factory

    return add


def make_mlp(
    input_dim: int,
    hidden: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """The paper's fully connected classifier: Flatten, (Linear, ReLU[, Dropout]) × depth, Linear.

    With ``batchnorm`` each hidden block is Linear → BatchNorm1d → ReLU [→ Dropout] (for the
    BatchNorm experiment; the paper's networks have no normalisation).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("mlp")
def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    hidden: Sequence[int] = MLP_HIDDEN,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """:func:`make_mlp` on the flattened input (any input shape)."""
    return make_mlp(math.prod(input_shape), tuple(hidden), num_outputs, dropout, batchnorm)


def image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input (``(H, W)``: one channel), else a ValueError naming ``model``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"model {model!r} takes images, one sample [H, W] or [C, H, W]; the inputs have shape {shape} "
            "(use --model mlp, or your own model, for other inputs)"
        )
    return shape  # type: ignore[return-value]


@register_model("cnn")
def cnn(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    channels: Sequence[int] = (32, 64),
    width: int = 128,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """A small CNN for 28×28 images (any size works): per entry of ``channels`` a 3×3 convolution
    (padding 1)[, BatchNorm], ReLU and 2×2 max-pooling (ceil mode), then Linear(``width``), ReLU
    [, Dropout] and the output Linear. With the defaults on 28×28×1: 421 642 weights (10 outputs)."""
    c, h, w = image_shape(input_shape, "cnn")
    layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, (c, h, w))]  # [N, H, W] or [N, C, H, W]
    for out in channels:
        layers.append(nn.Conv2d(c, out, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        c, h, w = out, -(-h // 2), -(-w // 2)
    layers += [nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with BatchNorm, plus the (projected) input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # not in place: the Fisher engine reads bn2's output


class ResNet(nn.Module):
    """The reduced ResNet of GEM (Lopez-Paz & Ranzato 2017) and A-GEM: a 3×3 stem (stride 1, no
    max-pooling) with ``nf`` filters, four stages of BasicBlocks (``blocks``) with ``nf``, 2·nf,
    4·nf, 8·nf filters and strides 1, 2, 2, 2, global average pooling and a linear head. GEM pools
    4×4 on 32×32 inputs, which is the global average there; here any image size works."""

    def __init__(
        self, input_shape: Sequence[int], num_outputs: int, nf: int = 20, blocks: Sequence[int] = (2, 2, 2, 2)
    ):
        super().__init__()
        c, h, w = image_shape(input_shape, "resnet18")
        self.input_shape = (c, h, w)
        self.conv1 = nn.Conv2d(c, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        stages: list[nn.Module] = []
        planes = nf
        for i, n in enumerate(blocks):
            width, stride = nf * 2**i, 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(planes, width, stride if j == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(planes, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x.reshape(len(x), *self.input_shape))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))


@register_model("resnet18")
def resnet18(input_shape: Sequence[int], num_outputs: int, *, nf: int = 20) -> ResNet:
    """The reduced ResNet-18 (BasicBlocks [2, 2, 2, 2], ``nf`` = 20 base filters) of GEM / A-GEM."""
    return ResNet(input_shape, num_outputs, nf=nf, blocks=(2, 2, 2, 2))


# ---- a model named by the user: a registered name, "module:factory", or the factory itself


def _import(spec: str) -> ModelFactory:
    """The object ``module:attr`` names, imported from ``sys.path``, then the working directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected MODULE:FACTORY, e.g. mypackage.nets:make_net")
    cwd = os.getcwd()
    if cwd not in {os.path.abspath(p or os.curdir) for p in sys.path}:
        sys.path.append(cwd)  # after everything else: the working directory does not shadow packages
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while it is imported
        raise ValueError(
            f"model {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); "
            "put it on PYTHONPATH or run from its folder"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable (a factory: input_shape, num_outputs)")
    return obj


def resolve_model(model: str | ModelFactory) -> ModelFactory:
    """The factory of a registered name, of ``"module:factory"`` (imported), or ``model`` itself."""
    if callable(model):
        return model
    if not isinstance(model, str):
        raise ValueError(f"model must be a name, MODULE:FACTORY or a factory, got {model!r}")
    if ":" in model:
        return _import(model)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}, or MODULE:FACTORY")
    return MODELS[model]


def model_name(model: str | ModelFactory) -> str:
    """How a run records ``model``: its name or ``module:factory`` (a factory's import path)."""
    if isinstance(model, str):
        return model
    for name, factory in MODELS.items():
        if factory is model:
            return name
    return f"{getattr(model, '__module__', '?')}:{getattr(model, '__qualname__', type(model).__qualname__)}"


@dataclass(frozen=True)
class ModelChoice(Constraint):
    """A registered model name, an importable ``module:factory``, or a factory (a callable)."""

    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        try:
            resolve_model(value)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        return f"one of {', '.join(MODELS)}, or MODULE:FACTORY (an importable model factory)"

    def message(self, value: Any, what: str) -> str:
        """The one wording, with the reason an import failed."""
        reason = ""
        if isinstance(value, str) and ":" in value:
            try:
                resolve_model(value)
            except ValueError as err:
                reason = f" ({err})"
        return super().message(value, what) + reason


def build_model(
    name: str | ModelFactory,
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    strict: bool = True,
    **options: Any,
) -> nn.Module:
    """A fresh model from a registered name, ``"module:factory"`` or a factory. ``options`` the
    factory does not declare are a clear error, or, with ``strict=False`` (the training loop,
    which offers every architecture setting), left out. A factory that returns no ``nn.Module``
    is a clear error."""
    factory = resolve_model(name)
    taken = accepted_options(factory, options)
    unknown = sorted(set(options) - set(taken))
    if unknown and strict:
        raise ValueError(f"model {model_name(name)!r} takes no option(s) {', '.join(unknown)}")
    net = factory(tuple(input_shape), num_outputs, **taken)
    if not isinstance(net, nn.Module):
        raise ValueError(f"model {model_name(name)!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


@torch.no_grad()
def check_outputs(model: nn.Module, x: Tensor, num_outputs: int, name: str) -> None:
    """A clear ValueError unless the model maps a batch of the tasks' inputs to logits
    ``[n, num_outputs]`` (in eval mode: no random numbers drawn, no BatchNorm statistics moved)."""
    was = model.training
    model.eval()
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"model {name!r} does not run on the tasks' inputs ({x.dtype} {list(x.shape[1:])} per sample): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or tuple(out.shape) != (len(x), num_outputs):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} must return logits [N, {num_outputs}] (num_outputs = {num_outputs}), got {got}"
        )


def check_model(
    model: str | ModelFactory,
    input_shape: Sequence[int],
    dtype: torch.dtype,
    num_outputs: int,
    **options: Any,
) -> None:
    """A clear ValueError unless ``model`` builds for ``input_shape`` (with those of ``options`` it
    takes) and maps inputs of that shape and dtype to ``[N, num_outputs]``: a run's settings are
    refused before any training. Torch's random state is left as it was."""
    name = model_name(model)
    with torch.random.fork_rng(devices=[]):
        try:
            net = build_model(model, input_shape, num_outputs, strict=False, **options)
        except ValueError:
            raise
        except Exception as err:  # a user's factory may raise anything
            raise ValueError(
                f"model {name!r} does not build for inputs {list(input_shape)}: {type(err).__name__}: {err}"
            ) from None
        check_outputs(net, torch.zeros(2, *input_shape, dtype=dtype), num_outputs, name)


def check_takes_dropout(model: str | ModelFactory, who: str) -> None:
    """A ValueError unless ``model``'s factory takes a ``dropout`` option (``who`` trains with one)."""
    if "dropout" not in model_options(model, dropout=0.0):
        raise ValueError(
            f"{who}: trains a network with dropout, and model {model_name(model)!r} takes no dropout "
            "option (use mlp, cnn or a factory with a dropout= keyword)"
        )


def model_options(name: str | ModelFactory, **options: Any) -> dict[str, Any]:
    """The subset of ``options`` that model ``name``'s factory takes (what a run records)."""
    return accepted_options(resolve_model(name), options)
