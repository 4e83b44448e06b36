"""The fast paths give the numbers of the reference paths (their speed is benchmarks/' business).

- d2lite.batch_norm (both of its internal paths: saving X - mean, or X for large inputs) against
  ATen and against d2l's from-scratch function, on smaller versions of the benchmark shapes;
- its float32 error on badly conditioned input (|mean| = 1000 std) no worse than ATen's;
- d2lite's data pipeline against d2l's (torchvision ``ToTensor`` through a ``DataLoader``);
- one training step of d2lite's LeNet-BN against the same step with nn.BatchNorm and with d2l's
  LeNet-BN (benchmarks/d2l_reference.py), from the same weights, on a real batch.

Tolerances: tests/helpers.py (float32: rtol 1e-5, atol 2e-6 x the largest |expected|).
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import d2lite
import d2lite.data as data
import d2lite.functional as functional
from d2lite.train import init_xavier
from helpers import assert_matches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import d2l_reference  # noqa: E402

# the benchmark shapes, smaller: (256,6,24,24), (256,16,8,8), (256,120), (128,64,56,56)
SHAPES = [(32, 6, 12, 12), (64, 16, 8, 8), (256, 120), (8, 64, 14, 14)]


@pytest.fixture(params=["save X - mean", "save X"])
def path(request, monkeypatch):
    """Run the test through each of batch_norm's two internal paths."""
    if request.param == "save X":
        monkeypatch.setattr(functional, "_SAVE_X_BYTES", 0)
    return request.param


def _inputs(shape, dtype=torch.float32, loc=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    X = torch.randn(shape, generator=g, dtype=dtype) * 3 + loc
    gamma = torch.rand(C, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(C, generator=g, dtype=dtype)
    dY = torch.randn(shape, generator=g, dtype=dtype)
    return X, gamma, beta, dY


def _fwd_bwd(fn, X, gamma, beta, dY):
    X, gamma, beta = (t.detach().clone().requires_grad_() for t in (X, gamma, beta))
    Y = fn(X, gamma, beta)
    return (Y, *torch.autograd.grad(Y, (X, gamma, beta), dY))


def _d2lite(X, gamma, beta):
    return d2lite.batch_norm(X, gamma, beta, None, None)[0]


def _aten(X, gamma, beta):
    return F.batch_norm(X, None, None, gamma, beta, training=True)


def _d2l(X, gamma, beta):
    view = (1, X.shape[1]) + (1,) * (X.dim() - 2)
    moving = torch.zeros(view), torch.ones(view)
    return d2l_reference.batch_norm(X, gamma.view(view), beta.view(view), *moving, eps=1e-5,
                                    momentum=0.9)[0]


CASES = [(shape, torch.contiguous_format) for shape in SHAPES] + [
    (shape, torch.channels_last) for shape in SHAPES if len(shape) == 4]


@pytest.mark.parametrize("shape, memory_format", CASES, ids=str)
def test_batch_norm_matches_aten_and_d2l(shape, memory_format, path):
    X, gamma, beta, dY = _inputs(shape)
    X = X.contiguous(memory_format=memory_format)
    ours = _fwd_bwd(_d2lite, X, gamma, beta, dY)
    for reference in (_aten, _d2l):
        expected = _fwd_bwd(reference, X, gamma, beta, dY)
        for name, got, want in zip(("Y", "dX", "dgamma", "dbeta"), ours, expected):
            assert_matches(got, want, torch.float32,
                           msg=lambda m: f"{reference.__name__} {name}: {m}")
    if memory_format == torch.channels_last:  # the layout is kept, as ATen keeps it
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_running_statistics_match_aten(shape, path):
    X, gamma, beta, _ = _inputs(shape)
    mean, var = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5
    _, new_mean, new_var = d2lite.batch_norm(X, gamma, beta, mean, var, momentum=0.3)
    F.batch_norm(X, mean, var, gamma, beta, training=True, momentum=0.3)  # updates in place
    assert_matches(new_mean, mean, torch.float32)
    assert_matches(new_var, var, torch.float32)


def test_float32_error_no_worse_than_atens_when_mean_dwarfs_std(path):
    """|mean| = 1000 std: a float32 sum of X would lose three digits; both must centre first."""
    X, gamma, beta, dY = _inputs((64, 6, 12, 12), dtype=torch.float64, loc=1000.0)
    X = X / 3  # std 1
    truth = _fwd_bwd(_aten, X, gamma, beta, dY)
    as32 = [t.float() for t in (X, gamma, beta, dY)]
    ours = _fwd_bwd(_d2lite, *as32)
    aten = _fwd_bwd(_aten, *as32)
    for name, o, a, t in zip(("Y", "dX", "dgamma", "dbeta"), ours, aten, truth):
        scale = t.abs().max()
        err_ours = ((o.double() - t).abs().max() / scale).item()
        err_aten = ((a.double() - t).abs().max() / scale).item()
        assert err_ours <= 2 * err_aten + 1e-6, (
            f"{name}: error {err_ours:.1e}, ATen's {err_aten:.1e}")


def test_gradcheck_both_paths(path):
    X, gamma, beta, _ = _inputs((5, 3, 2, 3), dtype=torch.float64)
    X, gamma, beta = (t.requires_grad_() for t in (X, gamma, beta))
    assert torch.autograd.gradcheck(lambda X, g, b: d2lite.batch_norm(X, g, b, None, None)[0],
                                    (X, gamma, beta))


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_loader_batches_equal_torchvision_to_tensor():
    """d2lite decodes once and cuts batches; d2l converts example by example with ToTensor."""
    root = str(data._locate(data.data_root()))
    subset = data._balanced_subset(data._load_split(data.data_root(), True, None)[1], 512, 0)
    train_iter, _ = d2lite.load_fashion_mnist(128, subset=512, seed=0, shuffle=False)
    reference, _ = d2l_reference.load_data_fashion_mnist(128, root=root, subset=512, seed=0)
    reference = DataLoader(Subset(reference.dataset.dataset, subset.tolist()), 128, shuffle=False)
    for (X, y), (X_ref, y_ref) in zip(train_iter, reference):
        assert torch.equal(X, X_ref) and torch.equal(y, y_ref)
    # shuffled: every epoch holds the same (image, label) pairs as d2l's dataset
    train_iter, _ = d2lite.load_fashion_mnist(128, subset=512, seed=0)
    X, y = map(torch.cat, zip(*train_iter))
    X_ref, y_ref = map(torch.cat, zip(*reference))
    key = lambda X, y: sorted(zip(y.tolist(), X.flatten(1).sum(1).tolist()))
    assert key(X, y) == key(X_ref, y_ref)


def _copy_lenet_weights(src, dst):
    """Copy conv/linear weights and BN parameters between LeNets built in the same layer order."""
    src_layers = [m for m in src.modules() if len(list(m.children())) == 0]
    dst_layers = [m for m in dst.modules() if len(list(m.children())) == 0]
    assert len(src_layers) == len(dst_layers)
    with torch.no_grad():
        for a, b in zip(src_layers, dst_layers):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pb.copy_(pa.view_as(pb))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lenet_bn_training_step_matches_nn_batchnorm_and_d2l(dtype):
    """float64 shows the three compute the same function; float32, that rounding stays small
    (the rounding of 16 layers adds up: rtol 1e-4, atol 1e-5 x the largest |expected|)."""
    torch.manual_seed(0)
    ours = d2lite.lenet(norm="d2lite")
    ours.apply(init_xavier)
    nets = {"d2lite": ours, "torch": d2lite.lenet(norm="torch"),
            "d2l": d2l_reference.lenet_bn_scratch()}
    for net in list(nets.values())[1:]:
        _copy_lenet_weights(ours, net)
    for net in nets.values():
        net.to(dtype)
    train_iter, _ = d2lite.load_fashion_mnist(256, subset=512, seed=0)
    X, y = next(iter(train_iter))
    X = X.to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)

    def close(got, want, what):
        torch.testing.assert_close(got, want, rtol=tol["rtol"],
                                   atol=tol["atol"] * want.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")
    results = {}
    for name, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        loss = nn.CrossEntropyLoss()(net(X), y)
        loss.backward()
        grads = [p.grad.detach().clone().flatten() for p in net.parameters()]
        opt.step()
        results[name] = (loss.detach(), grads, [p.detach().flatten() for p in net.parameters()])
    # the bias of a layer followed by batch norm gets a zero gradient (the mean absorbs it): only
    # rounding is left, so it is compared with the layer's weight gradient as the scale
    names = [n for n, _ in ours.named_parameters()]
    before_bn = {i for i, n in enumerate(names) if n.endswith(".bias") and n != "fc3.bias"}
    for name in ("torch", "d2l"):
        loss, grads, params = results[name]
        close(results["d2lite"][0], loss, f"{name} loss")
        for i, (got, want) in enumerate(zip(results["d2lite"][1], grads)):
            if i in before_bn:
                scale = grads[i - 1].abs().max().item()
                assert got.abs().max() <= 1e-5 * scale and want.abs().max() <= 1e-5 * scale
            else:
                close(got, want, f"{name} {names[i]} gradient")
        for i, (got, want) in enumerate(zip(results["d2lite"][2], params)):
            close(got, want, f"{name} {names[i]} after the step")
