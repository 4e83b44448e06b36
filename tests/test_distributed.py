"""d2lite.distributed: data-parallel training of LeNet-BN on 2 CPU processes against one process
at the same global batch, on the real Fashion-MNIST."""
import copy

import pytest
import torch

import d2lite
from d2lite.distributed import Shard, train_distributed


def _data(batch_size, subset, test_subset=512):
    return d2lite.load_fashion_mnist(batch_size, subset=subset, test_subset=test_subset, seed=3)


def _init_xavier():
    from d2lite.train import init_xavier
    return init_xavier


def _stats(net):
    return {k: v for k, v in net.state_dict().items() if "moving" in k}


def test_shards_are_the_batch_split_in_rank_order():
    train_iter, _ = _data(10, 25)
    shards = []
    for r in range(3):  # each rank's process holds a copy of the loader at the same epoch
        train_iter.epoch = 0
        shards.append(list(Shard(train_iter, r, 3)))
    train_iter.epoch = 0
    for k, (X, y) in enumerate(train_iter):
        assert torch.equal(torch.cat([s[k][0] for s in shards]), X)
        assert torch.equal(torch.cat([s[k][1] for s in shards]), y)
    assert [len(s[-1][1]) for s in shards] == [2, 2, 1]  # the last batch (5 examples)
    with pytest.raises(ValueError, match="rank must be in"):
        Shard(train_iter, 3, 3)


def test_one_step_with_sync_batch_norm_equals_one_process():
    """One global batch of 256: two processes of 128 with synchronized batch norm update the running
    statistics (computed in float32 from the same weights) and, through DDP's averaged gradients,
    the weights as one process of 256 does, to float32 rounding."""
    torch.manual_seed(0)
    net = d2lite.lenet(norm="d2lite")
    net.apply(_init_xavier())
    single = copy.deepcopy(net)
    train_iter, test_iter = _data(256, 256)
    d2lite.train(single, train_iter, test_iter, 1, 1.0, device="cpu", init=None, animate=False,
                 verbose=False)
    train_iter.epoch = 0
    local = copy.deepcopy(net)
    history = train_distributed(net, train_iter, test_iter, 1, 1.0, processes=2, init=None,
                                verbose=False)
    for name, value in _stats(single).items():
        torch.testing.assert_close(_stats(net)[name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert history.epochs[0].num_examples == 256 and len(history) == 1

    # each process with its own statistics: the running statistics are rank 0's half-batch's
    train_iter.epoch = 0
    train_distributed(local, train_iter, test_iter, 1, 1.0, processes=2, sync_bn=False, init=None,
                      verbose=False)
    differences = [(_stats(local)[k] - v).abs().max().item() for k, v in _stats(single).items()]
    assert max(differences) > 1e-3, differences


def test_two_processes_with_sync_batch_norm_learn_what_one_process_learns():
    torch.manual_seed(0)
    net = d2lite.lenet(norm="d2lite")
    net.apply(_init_xavier())
    single = copy.deepcopy(net)
    train_iter, test_iter = _data(128, 2048, 1000)
    one = d2lite.train(single, train_iter, test_iter, 2, 1.0, device="cpu", init=None,
                       animate=False, verbose=False)
    train_iter.epoch = 0
    two = train_distributed(net, train_iter, test_iter, 2, 1.0, processes=2, init=None, verbose=False)
    assert [e.num_examples for e in two.epochs] == [2048, 2048]
    assert one.final.test_acc > 0.5
    assert abs(two.final.test_acc - one.final.test_acc) < 0.02, (one.test_acc, two.test_acc)
    assert abs(two.final.train_loss - one.final.train_loss) < 0.02, (one.train_loss, two.train_loss)
    assert d2lite.evaluate_accuracy(net, test_iter) == pytest.approx(two.final.test_acc, abs=1e-9)


def test_train_distributed_refuses_what_it_cannot_do():
    train_iter, test_iter = _data(64, 64)
    with pytest.raises(TypeError, match="does not take 'animate'"):
        train_distributed(d2lite.lenet(), train_iter, test_iter, 1, 0.1, animate=True)


def _storage_bytes(x, *rest):
    return x.untyped_storage().nbytes()


def test_each_rank_holds_only_its_own_part():
    """X.split makes views of X's storage; a rank is given a copy of its part alone (as a process on
    another device would hold), so it cannot read the other ranks' parts without communicating."""
    X = torch.randn(8, 3, dtype=torch.float64)
    assert d2lite.map_ranks(_storage_bytes, X.split([3, 5])) == [3 * 3 * 8, 5 * 3 * 8]
    assert d2lite.map_ranks(_storage_bytes, list(zip(X.split([2, 6]), X.split([2, 6])))) == [2 * 3 * 8, 6 * 3 * 8]
    ranks = d2lite.grad_on_ranks(lambda x: x * 2, X.split([3, 5]), X.split([3, 5]))
    assert [tuple(r[1].shape) for r in ranks] == [(3, 3), (5, 3)]


def _others_found(x):
    """What a rank finds of the other ranks' parts (values 1000.5 + i, i < 24, not its own) and of
    the secret (7777.25) in the memory the fork gave it: every tensor the garbage collector knows and
    every local of its callers' frames."""
    import gc
    import sys

    wanted = ({1000.5 + i for i in range(24)} - set(x.detach().flatten().tolist())) | {7777.25}
    candidates = [o for o in gc.get_objects() if isinstance(o, (list, tuple, dict))]
    frame = sys._getframe(1)
    while frame is not None:
        candidates.append(dict(frame.f_locals))
        frame = frame.f_back
    found, seen = 0, set()
    for obj in candidates:
        for v in (obj.values() if isinstance(obj, dict) else obj):
            if isinstance(v, torch.Tensor) and id(v) not in seen and v.dtype == torch.float64:
                seen.add(id(v))
                found += sum(value in wanted for value in v.detach().flatten().tolist()[:10000])
    return found


def test_a_rank_finds_no_other_part_and_no_secret_in_its_memory(monkeypatch):
    """Under d2lite grade the oracle sets _forget_in_rank: each rank, once it holds its own copy of
    its part, wipes (in its copy of memory) the other ranks' parts and whatever else the grader
    sent, so that searching the memory it inherited (frames, the garbage collector) finds nothing of
    them; the parent's tensors are untouched."""
    import d2lite.distributed as module

    secret = torch.full((4, 3), 7777.25, dtype=torch.float64)
    monkeypatch.setattr(module, "_forget_in_rank", lambda: module._wipe([secret]))
    parts = [torch.arange(1000.5, 1009.5, dtype=torch.float64).view(3, 3),
             torch.arange(1009.5, 1024.5, dtype=torch.float64).view(5, 3)]  # never whole here
    assert d2lite.map_ranks(_others_found, parts) == [0, 0]
    assert d2lite.map_ranks(lambda x, s: float(s.sum()), parts, secret) == [7777.25 * 12] * 2  # its own copy
    ranks = d2lite.grad_on_ranks(lambda x: x * _others_found(x), parts, [torch.zeros_like(p) for p in parts])
    assert [float(r[0].abs().sum()) for r in ranks] == [0.0, 0.0]
    assert float(secret.sum()) == 7777.25 * 12 and float(torch.cat(parts).sum()) == sum(1000.5 + i for i in range(24))
    monkeypatch.setattr(module, "_forget_in_rank", None)
    assert d2lite.map_ranks(_others_found, parts) == [12, 12]  # without the hook: the secret is found (the parts never)


def test_ranks_split_into_groups_communicate_within_their_group():
    import torch.distributed as dist

    def total(x, group=None):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    parts = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([8.0])]
    assert [float(t) for t in d2lite.map_ranks(total, parts, groups=[[0, 1], [2, 3]])] == [3, 3, 12, 12]
    assert [float(t) for t in d2lite.map_ranks(total, parts, groups=[[0, 3], [1, 2]])] == [9, 6, 6, 9]
    assert [float(t) for t in d2lite.map_ranks(total, parts)] == [15] * 4
    ranks = d2lite.grad_on_ranks(lambda x, g: total(x, g), parts, parts, groups=[[0, 1], [2, 3]])
    assert [float(r[0]) for r in ranks] == [3, 3, 12, 12]
    for bad in ([[0, 1], [1, 2, 3]], [[0, 1], [2]], [[0, 1, 2, 3], []], [["a"]]):
        with pytest.raises(ValueError, match="groups must"):
            d2lite.map_ranks(total, parts, groups=bad)
