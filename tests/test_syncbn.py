"""d2lite.syncbn against the single-process truth: d2lite.BatchNorm on the concatenated batch.

Real processes (2 and 3, gloo over 127.0.0.1, forked by d2lite.launch). Float64 throughout, so
1e-10 is far above the rounding of the few reorderings the split makes (~1e-15) and far below
any real mistake (a rank's statistics instead of the batch's moves outputs by ~1e-1).
"""
import time

import pytest
import torch
from torch import nn

import d2lite
from d2lite.distributed import DistributedError, launch
from d2lite.syncbn import SyncBatchNorm, convert_sync_batchnorm, merge_moments, sync_batch_norm

TOL = dict(rtol=1e-10, atol=1e-10)
C = 3


def _layer(cls, options):
    torch.manual_seed(1)
    bn = cls(C, **options).double()
    if bn.affine:
        with torch.no_grad():
            bn.gamma.uniform_(0.5, 1.5)
            bn.beta.uniform_(-0.5, 0.5)
    return bn


def _run(bn, batches, sizes, rank, world, train_mode=True):
    """Steps of forward + backward of a weighted sum; what each step returned and left behind."""
    bn.train(train_mode)
    steps = []
    for X, W in batches:
        if world:  # this rank's slice
            X, W = X.split(sizes)[rank], W.split(sizes)[rank]
        X = X.clone().requires_grad_()
        Y = bn(X)
        (Y * W).sum().backward()
        grads = [p.grad.clone() if p.grad is not None else None for p in (bn.gamma, bn.beta)] \
            if bn.affine else [None, None]
        stats = [None if t is None else t.clone()
                 for t in (bn.moving_mean, bn.moving_var, bn.num_batches_tracked)]
        steps.append([Y.detach(), X.grad, *grads, *stats])
        bn.zero_grad()
    return steps


def _rank(rank, world, batches, sizes, options, train_mode):
    return _run(_layer(SyncBatchNorm, options), batches, sizes, rank, world, train_mode)


def _batches(shape, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3,
             torch.randn(shape, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def _check(world, shape, sizes, options=None, train_mode=True, steps=3):
    options = options or {}
    batches = _batches(shape, steps)
    truth = _run(_layer(d2lite.BatchNorm, options), batches, sizes, 0, 0, train_mode)
    ranks = launch(_rank, world, (batches, sizes, options, train_mode))
    for step, want in enumerate(truth):
        Y, dX, dgamma, dbeta, *stats = want
        torch.testing.assert_close(torch.cat([r[step][0] for r in ranks]), Y, **TOL,
                                   msg=lambda m: f"outputs, step {step}: {m}")
        torch.testing.assert_close(torch.cat([r[step][1] for r in ranks]), dX, **TOL,
                                   msg=lambda m: f"input gradients, step {step}: {m}")
        if dgamma is not None:  # each rank's γ/β gradient is its slice's; the all-reduce sums them
            torch.testing.assert_close(sum(r[step][2] for r in ranks), dgamma, **TOL)
            torch.testing.assert_close(sum(r[step][3] for r in ranks), dbeta, **TOL)
        for r in ranks:  # every rank holds the whole batch's running statistics
            for got, expected in zip(r[step][4:], stats):
                if expected is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, expected, **TOL,
                                               msg=lambda m: f"running statistics, step {step}: {m}")


SHAPES = [(12, C), (12, C, 5), (12, C, 4, 3), (12, C, 2, 3, 2)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "4d", "5d"])
def test_equals_batch_norm_on_the_concatenated_batch(world, shape):
    _check(world, shape, [12 // world] * world)


@pytest.mark.parametrize("world,sizes", [(2, [2, 10]), (3, [1, 4, 7]), (2, [0, 12]),
                                         (3, [5, 0, 7]), (3, [0, 0, 12])],
                         ids=["2-uneven", "3-uneven", "2-empty-rank", "3-empty-middle", "3-two-empty"])
def test_uneven_and_empty_batches(world, sizes):
    _check(world, (12, C, 4, 3), sizes)


@pytest.mark.parametrize("options", [dict(momentum=None), dict(momentum=0.5),
                                     dict(affine=False), dict(track_running_stats=False),
                                     dict(eps=1e-1)],
                         ids=["momentum-none", "momentum-0.5", "affine-off", "track-off", "eps"])
def test_options(options):
    _check(3, (12, C, 5), [3, 4, 5], options)


def test_eval_mode_uses_running_statistics_and_communicates_nothing():
    _check(2, (12, C, 4, 3), [5, 7], train_mode=False)

    def rank(r, world):  # only rank 0 calls it: a collective would wait for rank 1 forever
        if r == 0:
            bn = SyncBatchNorm(C).double().eval()
            X = torch.randn(4, C, dtype=torch.float64)
            return torch.equal(bn(X), d2lite.BatchNorm(C).double().eval()(X))
        return True
    assert launch(rank, 2, timeout=60) == [True, True]


def test_float32_matches_float32_batch_norm():
    def rank(r, world, X):
        return SyncBatchNorm(C)(X.split([3, 9])[r])
    X = torch.randn(12, C, 6, 6) * 5 + 100  # |mean| >> std: cancellation would show
    got = torch.cat(launch(rank, 2, (X,)))
    torch.testing.assert_close(got, d2lite.BatchNorm(C)(X), rtol=1e-5, atol=1e-5)


def test_without_a_process_group_or_with_one_process_it_is_batch_norm_exactly():
    assert not torch.distributed.is_initialized()
    X = torch.randn(8, C, 4, 4)
    sync, plain = _layer(SyncBatchNorm, {}).float(), _layer(d2lite.BatchNorm, {}).float()
    assert torch.equal(sync(X), plain(X))
    assert torch.equal(sync.moving_var, plain.moving_var)
    assert torch.equal(sync_batch_norm(X, None, None, None, None)[0],
                       d2lite.batch_norm(X, None, None, None, None)[0])

    def rank(r, world, X):
        return _layer(SyncBatchNorm, {}).float()(X)
    assert torch.equal(launch(rank, 1, (X,))[0], _layer(d2lite.BatchNorm, {}).float()(X))


def test_matches_nn_sync_batch_norm_where_pytorch_runs_it():
    """nn.SyncBatchNorm runs on the CPU only without a process group (it is batch norm then); in
    a group it refuses CPU tensors, where d2lite's runs."""
    X = torch.randn(8, C, 4, 4, dtype=torch.float64)
    ours, theirs = _layer(SyncBatchNorm, {}), nn.SyncBatchNorm(C).double()
    theirs.load_state_dict(ours.torch_state_dict())
    for _ in range(2):
        torch.testing.assert_close(ours(X), theirs(X), **TOL)
    torch.testing.assert_close(ours.moving_var, theirs.running_var, **TOL)

    def rank(r, world, X):
        try:
            nn.SyncBatchNorm(C).double()(X)
        except ValueError as e:
            refused = str(e)
        else:
            refused = ""
        return refused, SyncBatchNorm(C).double()(X).shape
    for refused, shape in launch(rank, 2, (X,)):
        assert "GPU" in refused or "CUDA" in refused or refused == "", refused
        assert shape == X.shape


def test_a_single_value_per_channel_over_all_ranks_is_refused_on_every_rank():
    def rank(r, world):
        X = torch.randn(1 if r == 0 else 0, C)
        try:
            sync_batch_norm(X, None, None, None, None)
        except ValueError as e:
            return str(e)
        return "no error"
    messages = launch(rank, 2)
    assert all("more than 1 value per channel" in m and "over all 2 processes" in m for m in messages)


def test_merge_moments_is_the_moments_of_the_union():
    x = torch.randn(20, 4, dtype=torch.float64)
    parts = x.split([0, 3, 17])
    counts = torch.tensor([len(p) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    count, mean, m2 = merge_moments(counts, means, m2s)
    assert count == 20
    torch.testing.assert_close(mean, x.mean(0), **TOL)
    torch.testing.assert_close(m2 / 20, x.var(0, unbiased=False), **TOL)


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    net = d2lite.lenet(norm="d2lite")
    torch_net = d2lite.lenet(norm="torch")
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(d2lite.lenet(norm="torch"))
    for model in (net, torch_net):
        before = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
        X = torch.randn(4, 1, 28, 28)
        model.eval()
        expected = model(X)
        converted = convert_sync_batchnorm(model)
        assert converted is model
        layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        assert len(layers) == sum(isinstance(m, nn.SyncBatchNorm) for m in reference.modules()) == 4
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        after = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
        for name, t in before.items():  # the same tensors, as nn.SyncBatchNorm's conversion keeps
            name = name.replace("weight", "gamma").replace("bias", "beta") if ".bn" in name or \
                name.split(".")[0].startswith("bn") else name
            name = name.replace("running_mean", "moving_mean").replace("running_var", "moving_var")
            assert after[name] is t, name
        assert all(not m.training for m in layers)
        assert torch.equal(model(X), expected)
    bn = d2lite.BatchNorm(C)
    assert isinstance(convert_sync_batchnorm(bn), SyncBatchNorm)
    assert convert_sync_batchnorm(bn).gamma is bn.gamma


def test_launch_reports_a_failing_rank_and_leaves_nothing_waiting():
    def rank(r, world):
        if r == 1:
            raise ArithmeticError("rank one is broken")
        torch.distributed.barrier()  # would wait forever for rank 1
    with pytest.raises(DistributedError, match="rank 1 failed(.|\n)*ArithmeticError: rank one is broken"):
        launch(rank, 2, timeout=60)


def test_launch_reports_a_dead_rank_and_a_rank_that_never_joins():
    import os

    def dies(r, world):
        if r == 0:
            os._exit(3)
        torch.distributed.barrier()
    with pytest.raises(DistributedError, match="rank 0 died"):
        launch(dies, 2, timeout=60)

    def hangs(r, world):  # rank 0 waits at a barrier that rank 1 never reaches
        if r == 0:
            torch.distributed.barrier()
        time.sleep(600)
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"ranks \[0, 1\] did not finish in time"):
        launch(hangs, 2, timeout=5)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("bad,message", [(0, "positive int"), (True, "positive int"),
                                         ("2", "positive int")])
def test_launch_checks_its_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        launch(lambda r, w: r, bad)
