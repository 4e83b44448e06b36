"""The LeNet family of the chapter and its exercises, and PyTorch's MNIST net, built from options."""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from torch import nn

from .layers import AvgPool2d, Conv2d
from .modules import BatchNorm

__all__ = ["lenet", "LAYERS", "VARIANTS", "mnist_net", "MNIST_LAYERS", "count_parameters"]

LAYERS = ("conv1", "conv2", "fc1", "fc2")  # the layers that can be followed by batch norm

# channels, hidden sizes, input size, padding of conv1, activation, pooling
VARIANTS = {
    # d2l §8.5's LeNet: 28x28 input, no padding (16*4*4 features), sigmoid, average pooling
    "d2l": dict(channels=(6, 16), hidden=(120, 84), input_size=28, padding=0,
                activation="sigmoid", pool="avg"),
    # deeplizard's network: ReLU and max pooling, 6 and 12 channels, 120 and 60 units
    "deeplizard": dict(channels=(6, 12), hidden=(120, 60), input_size=28, padding=0,
                       activation="relu", pool="max"),
    # LeNet-5 on 32x32 input (Fashion-MNIST resized to 32): 16*5*5 features
    "lenet5": dict(channels=(6, 16), hidden=(120, 84), input_size=32, padding=0,
                   activation="relu", pool="max"),
}
_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}
_POOLS = {"avg": AvgPool2d, "max": nn.MaxPool2d}  # d2lite.layers: nn.AvgPool2d, faster
_NORMS = {"d2lite": lambda c, dims: BatchNorm(c),
          "torch": lambda c, dims: nn.BatchNorm2d(c) if dims == 4 else nn.BatchNorm1d(c)}


def lenet(variant: str = "d2l", *, norm: str | None = None,
          norm_layers: Iterable[str] | str = LAYERS, norm_position: str = "before",
          bias: bool = True, activation: str | None = None, pool: str | None = None,
          dropout: float = 0.0, dropout_layers: Iterable[str] = ("fc1", "fc2"),
          input_size: int | None = None, num_classes: int = 10) -> nn.Sequential:
    """A LeNet for (N, 1, H, W) images returning logits of shape (N, num_classes).

    variant: ``"d2l"`` (the chapter's: sigmoid, average pooling, 28x28), ``"deeplizard"`` (ReLU,
        max pooling) or ``"lenet5"`` (32x32 input: load the data with ``resize=32``).
    norm: ``None`` (no batch norm), ``"d2lite"`` (d2lite.BatchNorm) or ``"torch"``
        (nn.BatchNorm2d after convolutions, nn.BatchNorm1d after linear layers).
    norm_layers: which of ``LAYERS`` ("conv1", "conv2", "fc1", "fc2") get batch norm, or "all".
    norm_position: ``"before"`` the activation (the book's, Ioffe & Szegedy's) or ``"after"``.
    bias: False drops the bias of every layer directly followed by batch norm, i.e. with
        ``norm_position="before"`` (it is redundant there: the normalization subtracts it again);
        every other layer keeps its bias.
    activation, pool: override the variant's (``"sigmoid"``, ``"relu"``, ``"tanh"``; ``"avg"``,
        ``"max"``).
    dropout: probability of nn.Dropout after the activation of the layers in ``dropout_layers``.

    Layers are named (``conv1``, ``bn1``, ``act1``, ``pool1``, …, ``fc3``), and the order of
    the d2l variant with batch norm everywhere is the book's, so ``net[1]`` is the first BatchNorm.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    spec = dict(VARIANTS[variant])
    activation = activation or spec["activation"]
    pool = pool or spec["pool"]
    input_size = input_size or spec["input_size"]
    norm_layers = LAYERS if norm_layers == "all" else tuple(norm_layers)
    dropout_layers = tuple(dropout_layers)
    _check_choice("norm", norm, (None, *_NORMS))
    _check_choice("norm_position", norm_position, ("before", "after"))
    _check_choice("activation", activation, tuple(_ACTIVATIONS))
    _check_choice("pool", pool, tuple(_POOLS))
    for name, chosen in (("norm_layers", norm_layers), ("dropout_layers", dropout_layers)):
        unknown = set(chosen) - set(LAYERS)
        if unknown:
            raise ValueError(f"{name} may name only {LAYERS}, got unknown {sorted(unknown)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    (c1, c2), (h1, h2) = spec["channels"], spec["hidden"]
    side = ((input_size + 2 * spec["padding"] - 4) // 2 - 4) // 2  # two conv5 + pool2 stages
    if side < 1:
        raise ValueError(f"input_size {input_size} is too small for two 5x5 convolutions and pools")
    layers: list[tuple[str, nn.Module]] = []

    def block(name: str, index: int, make_layer, width: int, dims: int) -> None:
        normed = norm is not None and name in norm_layers
        layers.append((name, make_layer(bias or not (normed and norm_position == "before"))))
        bn = [(f"bn{index}", _NORMS[norm](width, dims))] if normed else []
        act = [(f"act{index}", _ACTIVATIONS[activation]())]
        layers.extend(bn + act if norm_position == "before" else act + bn)
        if dropout and name in dropout_layers:
            layers.append((f"drop{index}", nn.Dropout(dropout)))

    block("conv1", 1, lambda b: Conv2d(1, c1, 5, padding=spec["padding"], bias=b), c1, 4)
    layers.append(("pool1", _POOLS[pool](2, 2)))
    block("conv2", 2, lambda b: Conv2d(c1, c2, 5, bias=b), c2, 4)
    layers += [("pool2", _POOLS[pool](2, 2)), ("flatten", nn.Flatten())]
    block("fc1", 3, lambda b: nn.Linear(c2 * side * side, h1, bias=b), h1, 2)
    block("fc2", 4, lambda b: nn.Linear(h1, h2, bias=b), h2, 2)
    layers.append(("fc3", nn.Linear(h2, num_classes)))
    return nn.Sequential(OrderedDict(layers))


MNIST_LAYERS = ("conv1", "conv2", "fc1")  # the layers of mnist_net that can have batch norm


def mnist_net(*, norm: str | None = None, norm_layers: Iterable[str] | str = ("conv2", "fc1"),
              dropout: float = 0.0, num_classes: int = 10) -> nn.Sequential:
    """PyTorch's classic MNIST example network for (N, 1, 28, 28) images, returning log-probabilities
    of shape (N, num_classes), with batch norm where asked (the blog's: on conv2 and fc1 only).

    conv1 1→10 (5x5) → max-pool 2 → ReLU; conv2 10→20 (5x5) → max-pool 2 → ReLU; flatten (320);
    fc1 320→50 → ReLU; fc2 50→num_classes; log-softmax. 21,840 parameters without batch norm.

    norm: ``None`` (no batch norm), ``"d2lite"`` (d2lite.BatchNorm) or ``"torch"`` (nn.BatchNorm2d
        after a convolution, nn.BatchNorm1d after fc1); each goes straight after its layer, before
        the pooling and the ReLU.
    norm_layers: which of ``MNIST_LAYERS`` ("conv1", "conv2", "fc1") get batch norm, or "all";
        the default, conv2 and fc1, is the blog's network.
    dropout: 0 (the default) leaves it out; p > 0 puts it where the PyTorch example has it,
        nn.Dropout2d(p) after conv2 (and its batch norm) and nn.Dropout(p) after fc1's ReLU.

    The output is ``log_softmax`` of the logits; d2lite.train's nn.CrossEntropyLoss takes it as it
    would the logits (log-softmax of log-probabilities is themselves), so the loss, its gradients
    and the accuracy are those of nn.NLLLoss on this output. Layers are named (``conv1``, ``bn1``,
    ``pool1``, ``act1``, ``conv2``, ``bn2``, ``drop2``, …, ``fc1``, ``bn3``, ``act3``, ``drop3``,
    ``fc2``, ``log_softmax``).
    """
    norm_layers = MNIST_LAYERS if norm_layers == "all" else (
        (norm_layers,) if isinstance(norm_layers, str) else tuple(norm_layers))
    _check_choice("norm", norm, (None, *_NORMS))
    unknown = set(norm_layers) - set(MNIST_LAYERS)
    if unknown:
        raise ValueError(f"norm_layers may name only {MNIST_LAYERS} (or be \"all\"), "
                         f"got unknown {sorted(unknown)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")

    def bn(index: int, name: str, width: int, dims: int) -> list[tuple[str, nn.Module]]:
        return [(f"bn{index}", _NORMS[norm](width, dims))] if norm and name in norm_layers else []

    drop2 = [("drop2", nn.Dropout2d(dropout))] if dropout else []
    drop3 = [("drop3", nn.Dropout(dropout))] if dropout else []
    layers = [("conv1", Conv2d(1, 10, 5)), *bn(1, "conv1", 10, 4),
              ("pool1", nn.MaxPool2d(2)), ("act1", nn.ReLU()),
              ("conv2", Conv2d(10, 20, 5)), *bn(2, "conv2", 20, 4), *drop2,
              ("pool2", nn.MaxPool2d(2)), ("act2", nn.ReLU()), ("flatten", nn.Flatten()),
              ("fc1", nn.Linear(20 * 4 * 4, 50)), *bn(3, "fc1", 50, 2), ("act3", nn.ReLU()), *drop3,
              ("fc2", nn.Linear(50, num_classes)), ("log_softmax", nn.LogSoftmax(dim=1))]
    return nn.Sequential(OrderedDict(layers))


def count_parameters(net: nn.Module, trainable_only: bool = True) -> int:
    """The number of (trainable) scalar parameters of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def _check_choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
