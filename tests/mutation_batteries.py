"""Per-notebook batteries for mutation testing: probes that tell a surviving mutant from the reference.

A probe is (label, call): call(ns) computes something from a notebook namespace, drawing its inputs
afresh from fixed seeds, so the reference's namespace and the mutant's get equal inputs. A mutant is
equivalent only if every probe of its notebook agrees (values at torch.testing.assert_close's
default tolerance for the dtype, NaN equal to NaN; shapes, dtypes, requires_grad, whether a graph
is attached, exception types, Python types and module structure exactly), and the plain values its
solution cells define (predictions such as ``ranks_1d``) are equal too.
"""
from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

F64, F32 = torch.float64, torch.float32


# ------------------------------------------------------------------------------------- comparing
def differ(a, b, path="result", value_atol=1e-9) -> str | None:
    """None if a and b agree, else a line saying where they differ (floats: within value_atol)."""
    if type(a).__qualname__ != type(b).__qualname__:  # a class the solution defines exists twice
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        if a.requires_grad != b.requires_grad or (a.grad_fn is None) != (b.grad_fn is None):
            return f"{path}: requires_grad/grad_fn {a.requires_grad}/{a.grad_fn} vs {b.requires_grad}/{b.grad_fn}"
        try:
            torch.testing.assert_close(a.detach(), b.detach(), equal_nan=True)
        except AssertionError as error:
            return f"{path}: values differ ({str(error).splitlines()[-1].strip()})"
        return None
    if isinstance(a, float):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=value_atol)
        return None if same else f"{path}: {a!r} vs {b!r}"
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := differ(x, y, f"{path}[{i}]", value_atol))), None)
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        return next((d for k in a if (d := differ(a[k], b[k], f"{path}[{k!r}]", value_atol))), None)
    if isinstance(a, nn.Module):
        return differ(module_state(a), module_state(b), path)
    if isinstance(a, (set, frozenset, int, str, bool, type(None))):
        return None if a == b else f"{path}: {a!r} vs {b!r}"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def module_state(m: nn.Module):
    """What a module is, as data: its modules' classes and attributes, parameters and buffers."""
    kinds = [(name, type(mod).__name__, repr(mod) if not list(mod.children()) else "") for name, mod in m.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
              for n, p in m.named_parameters()}
    return {"modules": kinds, "parameters": params, "state": dict(m.state_dict()), "training": m.training}


def outcome(call, ns):
    """call(ns), or the name of the exception it raised; the global RNG seeded first."""
    torch.manual_seed(0)
    try:
        return call(ns)
    except Exception as error:  # noqa: BLE001 - raising is a behaviour to compare
        return ("raised", type(error).__name__)


def values_of(ns) -> dict:
    """The plain values a namespace holds (numbers, strings, containers of them): predictions."""
    plain = (bool, int, float, str, set, frozenset, dict, list, tuple, type(None))
    return {k: v for k, v in ns.items() if not k.startswith("_") and isinstance(v, plain)}


def battery(*probes, value_atol=1e-9):
    """A battery: (ref_ns, mut_ns, names) -> (disagreeing probes, probes run). The plain values among
    `names` (those the solution cells store) are compared too, floats within value_atol."""
    def run(ref, mut, names=()):
        disagree = []
        ref_values, mut_values = values_of(ref), values_of(mut)
        for name in sorted((set(ref_values) | set(mut_values)) & set(names)):
            d = differ(ref_values.get(name), mut_values.get(name), name, value_atol)
            if d:
                disagree.append(d)
        for label, call in probes:
            d = differ(outcome(call, ref), outcome(call, mut), label)
            if d:
                disagree.append(d)
        return disagree, [label for label, _ in probes]

    def broken(ns):
        """The probes that raise on the reference although their label does not say "raises"
        (a probe that raises for everyone would agree with every mutant)."""
        return [label for label, call in probes if "raises" not in label
                and isinstance(got := outcome(call, ns), tuple) and got[:1] == ("raised",)]
    run.broken = broken
    return run


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, dtype=F64, scale=1.0, shift=0.0, grad=False):
    t = torch.randn(shape, generator=gen(seed), dtype=dtype) * scale + shift
    return t.requires_grad_() if grad else t


def with_grads(f, inputs, seed=99):
    """f(*inputs)'s outputs plus the gradients of a random linear loss of its first output."""
    out = f(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    grads = []
    if isinstance(first, torch.Tensor) and first.requires_grad:
        dY = torch.randn(first.shape, generator=gen(seed), dtype=first.dtype)
        grads = list(torch.autograd.grad(first, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad],
                                         dY, allow_unused=True, retain_graph=True))
    return out, grads


# ------------------------------------------------------------------------------- 00_from_scratch
def _bn_case(shape, dtype, training, eps, momentum, seed, grad=True):
    def call(ns):
        C = shape[1]
        X = rand(shape, seed, dtype, 2.0, 1.0, grad)
        gamma = (torch.rand(C, generator=gen(seed + 1), dtype=dtype) + 0.5).requires_grad_(grad)
        beta = rand((C,), seed + 2, dtype, grad=grad)
        mm = rand((C,), seed + 3, dtype)
        mv = torch.rand(C, generator=gen(seed + 4), dtype=dtype) + 0.5
        f = lambda X, g, b: ns["batch_norm"](X, g, b, mm.clone(), mv.clone(), eps=eps, momentum=momentum,
                                             training=training)
        return with_grads(f, (X, gamma, beta))
    return (f"batch_norm{shape} {dtype} training={training} eps={eps} momentum={momentum}", call)


def _bn_chain(shape, dtype, steps=3):
    def call(ns):
        C = shape[1]
        mm, mv, outs = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), []
        for step in range(steps):
            X = rand(shape, 50 + step, dtype, 1.5, step)
            Y, mm, mv = ns["batch_norm"](X, torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype), mm, mv,
                                         momentum=0.3)
            outs.append((Y, mm, mv))
        outs.append(ns["batch_norm"](rand(shape, 60, dtype), torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype),
                                     mm, mv, training=False))
        return outs
    return (f"batch_norm chained {steps} steps {shape} {dtype}", call)


def _gb_case(shape, dtype, eps, seed):
    def call(ns):
        return ns["gamma_beta_grads"](rand(shape, seed, dtype, 2.0, 1.0), rand(shape, seed + 1, dtype), eps=eps)
    return (f"gamma_beta_grads{shape} {dtype} eps={eps}", call)


BATTERY_00 = battery(
    *[_bn_case(shape, dtype, training, eps, momentum, seed)
      for seed, (shape, dtype, training, eps, momentum) in enumerate(itertools.product(
          [(2, 3), (9, 4), (4, 2, 3, 3), (1, 3, 2, 5)], [F64, F32], [True, False], [1e-5, 0.7], [0.1, 0.6, 1.0]))],
    _bn_case((1, 3), F64, False, 1e-5, 0.1, 7), _bn_case((5, 1), F64, True, 2.0, 0.0, 8),
    _bn_chain((6, 3), F64), _bn_chain((3, 2, 2, 2), F32),
    *[_gb_case(shape, dtype, eps, seed) for seed, (shape, dtype, eps) in enumerate(itertools.product(
        [(2, 3), (7, 5)], [F64, F32], [1e-5, 0.5]))],
)


# -------------------------------------------------------------------------------------- 01_bias
def _lenets(d2lite):
    return [d2lite.lenet(norm="d2lite"), d2lite.lenet(), d2lite.lenet(norm="torch"),
            d2lite.lenet(norm="d2lite", norm_position="after"), d2lite.lenet(norm="d2lite", norm_layers=("conv2", "fc1")),
            d2lite.lenet(norm="d2lite", bias=False), d2lite.lenet("deeplizard", norm="torch", norm_layers=("fc2",)),
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3),
                          nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False), nn.BatchNorm1d(2), nn.Linear(2, 2)),
            nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)),
            nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))]


def _each_net(f):
    return lambda ns: [f(ns, net) for net in _lenets(ns["d2lite"])]


def _stripped(ns, net):
    before = copy.deepcopy(net.state_dict())
    out = ns["without_redundant_biases"](net)
    return (out is net, out, [torch.equal(v, net.state_dict()[k]) for k, v in before.items()], list(net.state_dict()))


def _shift(ns, mode, c):
    d2lite = ns["d2lite"]
    out = []
    for net in (d2lite.lenet(norm="d2lite").double(), d2lite.lenet(norm="torch").double()):
        getattr(net, mode)()
        X = rand((6, 1, 28, 28), 3)
        state = copy.deepcopy(net.state_dict())
        for layer in ("conv1", "conv2", "fc1", "fc2", "fc3"):
            shifted = ns["shift_bias"](net, layer, c)
            change = ns["max_output_change"](net, X, layer, c)
            out.append((shifted is net, type(change).__name__, round(change, 6) if isinstance(change, float) else change,
                        getattr(shifted, layer).bias.detach().clone(), shifted.training, net.training))
        out.append([torch.equal(v, state[k]) for k, v in net.state_dict().items()])
    return out


BATTERY_01 = battery(
    ("redundant_biases", _each_net(lambda ns, net: ns["redundant_biases"](net))),
    ("without_redundant_biases", _each_net(_stripped)),
    ("parameters_saved", _each_net(lambda ns, net: ns["parameters_saved"](net))),
    *[(f"shift_bias/max_output_change {mode} c={c}", lambda ns, mode=mode, c=c: _shift(ns, mode, c))
      for mode in ("train", "eval") for c in (2.5, -1.0)],
)


# ----------------------------------------------------------------------------- 02_learning_rates
def _histories(ns, count=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(1, 5, (1,), generator=g))
        losses = (torch.rand(n, generator=g) * 3).tolist()
        if torch.rand(1, generator=g) < 0.25:
            losses[int(torch.randint(0, n, (1,), generator=g))] = [float("nan"), float("inf"), -float("inf")][
                int(torch.randint(0, 3, (1,), generator=g))]
        test = (torch.rand(n, generator=g) * 0.4 + 0.02).tolist()
        train = (torch.rand(n, generator=g)).tolist()
        out.append(ns["make_history"](losses, test, train))
    return out


def _failed_probe(chance, margin):
    def call(ns):
        return [ns["failed"](h, chance, margin) if (chance, margin) != (None, None) else ns["failed"](h)
                for h in _histories(ns)]
    return (f"failed chance={chance} margin={margin}", call)


def _largest_probe(chance, margin):
    def call(ns):
        hs = _histories(ns, 40, seed=1)
        lrs = [0.01, 0.1, 1.0, 3.0, 10.0, 30.0]
        sweeps = [dict(zip(lrs[k % 3:], hs[k:k + 4])) for k in range(0, 36, 2)] + [{}]
        kwargs = {} if chance is None else {"chance": chance, "margin": margin}
        return [ns["largest_working_lr"](s, **kwargs) for s in sweeps]
    return (f"largest_working_lr chance={chance} margin={margin}", call)


BATTERY_02 = battery(*[_failed_probe(c, m) for c, m in ((None, None), (0.1, 0.05), (0.2, 0.0), (0.05, 0.15), (0.3, 0.02))],
                     *[_largest_probe(c, m) for c, m in ((None, None), (0.2, 0.05), (0.1, 0.2))])


# -------------------------------------------------------------------------------- 03_every_layer
def _variant_net(ns, v, p):
    kwargs = ns["variant_kwargs"](v, p) if p else ns["variant_kwargs"](v)
    torch.manual_seed(0)
    return ns["d2lite"].lenet(**kwargs)  # the network it builds is what the kwargs mean


BATTERY_03 = battery(*[(f"d2lite.lenet(**variant_kwargs({v!r}, {p!r}))" + (" (raises)" if v in ("some", "ALL") or p == "middle" else ""),
                        lambda ns, v=v, p=p: _variant_net(ns, v, p))
                       for v in ("none", "first", "conv", "dense", "all", "some", "ALL")
                       for p in ("before", "after", None, "middle")])


# ------------------------------------------------------------------------------------ 04_dropout
def _gap_probe(ns):
    from d2lite.train import EpochStats, History
    g = gen(4)
    out = []
    for n in range(0, 6):
        train, test = torch.rand(n, generator=g).tolist(), torch.rand(n, generator=g).tolist()
        h = History(name="h", epochs=[EpochStats(epoch=i + 1, train_loss=1.0, train_acc=a, test_acc=b, lr=0.1,
                                                 examples_per_sec=0.0, seconds=0.0) for i, (a, b) in enumerate(zip(train, test))])
        for last in (None, 1, 2, 3, 7):
            out.append(outcome(lambda ns: ns["generalization_gap"](h) if last is None else ns["generalization_gap"](h, last), ns))
    return out


def _risk_nets(d2lite):
    return [d2lite.lenet("deeplizard", norm="d2lite", dropout=0.5),
            d2lite.lenet("deeplizard", norm="d2lite", dropout=0.5, dropout_layers=("fc2",)),
            d2lite.lenet("deeplizard", dropout=0.5), d2lite.lenet(norm="torch", dropout=0.5),
            d2lite.lenet(norm="d2lite", norm_layers=("fc2",), dropout=0.5),
            nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
                          nn.Dropout(0.5), nn.Dropout(0.1), nn.BatchNorm1d(8), nn.Dropout(0.3)),
            nn.Sequential(nn.Dropout(0.1), nn.Dropout2d(0.1), nn.AlphaDropout(0.1), nn.BatchNorm2d(3),
                          nn.Dropout3d(0.2), nn.BatchNorm3d(2), nn.BatchNorm3d(2))]


BATTERY_04 = battery(("generalization_gap", _gap_probe),
                     ("variance_shift_risks", lambda ns: [ns["variance_shift_risks"](n) for n in _risk_nets(ns["d2lite"])]))


# ---------------------------------------------------------------------------- 05_fixed_gamma_beta
def _bn_layers(d2lite):
    return [d2lite.BatchNorm(3), d2lite.BatchNorm(3, affine=False), nn.BatchNorm1d(3), nn.BatchNorm2d(3, affine=False),
            nn.BatchNorm3d(2), nn.Linear(3, 3), nn.ReLU()]


def _affine_probe(ns):
    out = []
    for layer in _bn_layers(ns["d2lite"]):
        got = outcome(lambda ns: ns["affine_parameters"](layer), ns)
        names = dict(layer.named_parameters())
        out.append(got if isinstance(got, tuple) and got and got[0] == "raised" else
                   (type(got).__name__, [next((n for n, p in names.items() if p is x), repr(x)) for x in got]))
    return out


def _freeze_probe(gamma, beta):
    def call(ns):
        d2lite = ns["d2lite"]
        nets = [d2lite.lenet(norm="d2lite"), d2lite.lenet(norm="torch"),
                nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), d2lite.BatchNorm(4, affine=False),
                              nn.Linear(4, 2), d2lite.BatchNorm(2))]
        out = []
        for net in nets:
            (net(torch.randn(4, *((1, 28, 28) if isinstance(net[0], nn.Conv2d) else (5,)))) ** 2).sum().backward()
            kwargs = {} if gamma is None else {"gamma": gamma, "beta": beta}
            returned = ns["freeze_affine"](net, **kwargs)
            out.append((returned is net, net))
        return out
    return (f"freeze_affine gamma={gamma} beta={beta}", call)


def _identity_probe(ns):
    d2lite, out = ns["d2lite"], []
    for k, (make, shape, dtype) in enumerate([(lambda: d2lite.BatchNorm(4), (16, 4), F32),
                                              (lambda: nn.BatchNorm1d(3, eps=0.5).double(), (3, 3), F64),
                                              (lambda: nn.BatchNorm2d(2).double(), (4, 2, 3, 3), F64),
                                              (lambda: d2lite.BatchNorm(3, eps=0.1).double(), (2, 3, 2, 5), F64)]):
        bn = make()
        X = rand(shape, 20 + k, dtype, 3.0, 1.0)
        out.append((ns["recover_identity"](bn, X) is bn, bn))
    return out


BATTERY_05 = battery(("affine_parameters", _affine_probe),
                     *[_freeze_probe(g, b) for g, b in ((None, None), (2.0, 0.5), (0.0, 1.0), (1.0, -1.0))],
                     ("recover_identity", _identity_probe))


# ---------------------------------------------------------------------------------------- 06_api
# the predictions are asked for "up to about 1e-4" (PyTorch's float32 rounding): closer is equal
BATTERY_06 = battery(("recompute_running_stats", lambda ns: _recompute(ns)), value_atol=1e-4)


def _recompute(ns):
    out = []
    for training in (True, False):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=0.2), nn.ReLU(),
                            nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=None)), nn.BatchNorm1d(3)).train(training)
        with torch.no_grad():
            net(torch.randn(8, 5))
        batches = [rand((6 + i, 5), 40 + i, F32, 1 + i, i) for i in range(3)]
        returned = ns["recompute_running_stats"](net, iter(batches))
        out.append((returned is net, net, [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm1d)],
                    [m.training for m in net.modules()]))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    out.append(ns["recompute_running_stats"](conv, [rand((2, 1, 5, 5), 70, F32)]))
    return out


# --------------------------------------------------------------------------------------- 07_lite
def _affine_inputs(shape, params, seed, dtype):
    """(X, gamma, beta) needing grad: X of ``shape``, gamma in [0.5, 1.5) and beta of shape ``params``."""
    X = rand(shape, seed, dtype, 2.0, 1.0, grad=True)
    gamma = (torch.rand(params, generator=gen(seed + 1), dtype=dtype) + 0.5).requires_grad_()
    return X, gamma, rand(params, seed + 2, dtype, grad=True)


def _lite_case(shape, dtype, mode, eps, seed):
    def call(ns):
        X, gamma, beta = _affine_inputs(shape, (shape[1],), seed, dtype)
        return with_grads(lambda X, g, b: ns["batch_norm_lite"](X, g, b, mode, eps) if eps else
                          ns["batch_norm_lite"](X, g, b, mode), (X, gamma, beta))
    return (f"batch_norm_lite{shape} {dtype} {mode} eps={eps}" + (" (raises)" if mode not in ("full", "center", "scale") else ""), call)


def _module_probe(ns):
    out = []
    for args in ((3,), (4, "center"), (2, "scale", 0.5), (5, "full", 2.0)):  # (no rule for a bad mode here)
        m = outcome(lambda ns: ns["BatchNormLite"](*args), ns)
        if isinstance(m, tuple):
            out.append(m)
            continue
        X = rand((6, args[0]), 5, F32, 2.0, 1.0)
        X4 = rand((3, args[0], 2, 2), 6, F32, 2.0, 1.0)
        out.append((m.num_features, m.mode, m.eps, m, m(X), m(X4), m.eval()(X), repr(m)))
    return out


def _lenet_probe(ns):
    out = []
    for mode in (None, "full", "center", "scale"):
        torch.manual_seed(0)
        net = ns["lenet_lite"](mode)
        out.append((net, net(rand((2, 1, 28, 28), 8, F32))))
    return out


BATTERY_07 = battery(*[_lite_case(shape, dtype, mode, eps, seed) for seed, (shape, dtype, mode, eps) in enumerate(
    itertools.product([(5, 3), (2, 2, 3, 3), (1, 4)], [F64, F32], ["full", "center", "scale", "both"], [None, 0.5]))],
    ("BatchNormLite", _module_probe), ("lenet_lite", _lenet_probe))


# ---------------------------------------------------------------------------- 08_other_normalizations
def _ln_case(shape, eps, seed):
    def call(ns):
        X, g, b = _affine_inputs(shape, tuple(shape[1:]), seed, F64)
        return with_grads(lambda X, g, b: ns["layer_norm"](X, g, b, eps) if eps else ns["layer_norm"](X, g, b), (X, g, b))
    return (f"layer_norm{shape} eps={eps}", call)


def _gn_case(shape, groups, eps, seed, dtype=F64):
    def call(ns):
        X, g, b = _affine_inputs(shape, (shape[1],), seed, dtype)
        return with_grads(lambda X, g, b: ns["group_norm"](X, groups, g, b, eps) if eps else
                          ns["group_norm"](X, groups, g, b), (X, g, b))
    return (f"group_norm{shape} G={groups} eps={eps} {dtype}", call)


def _output_change_probe(ns):
    F = torch.nn.functional
    fs = [lambda X: F.batch_norm(X, None, None, training=True), lambda X: X * 2, lambda X: X - X.mean(0, keepdim=True),
          lambda X: X.cumsum(0), lambda X: X.flip(0)]
    x, a, b = rand((1, 3, 2, 2), 1), rand((4, 3, 2, 2), 2), rand((2, 3, 2, 2), 3, scale=3.0, shift=1.0)
    out = [ns["output_change"](f, x, a, b) for f in fs]
    return [type(v).__name__ for v in out], [round(v, 6) if isinstance(v, float) else v for v in out]


def _renorm_case(N, C, r_max, d_max, eps, momentum, seed, dtype=F64):
    def call(ns):
        X = rand((N, C), seed, dtype, 2.0, 1.0, grad=True)
        g = (torch.rand(C, generator=gen(seed + 1), dtype=dtype) + 0.5).requires_grad_()
        b = rand((C,), seed + 2, dtype, grad=True)
        rm, rv = rand((C,), seed + 3, dtype), torch.rand(C, generator=gen(seed + 4), dtype=dtype) * 3 + 0.2
        return with_grads(lambda X, g, b: ns["batch_renorm"](X, g, b, rm.clone(), rv.clone(), r_max, d_max,
                                                             eps=eps, momentum=momentum), (X, g, b))
    return (f"batch_renorm ({N}, {C}) r_max={r_max} d_max={d_max} eps={eps} momentum={momentum}", call)


def _whiten_case(n, D, eps, seed, dtype=F64):
    def call(ns):
        X = rand((n, D), seed, dtype) @ rand((D, D), seed + 1, dtype) + rand((D,), seed + 2, dtype)
        return ns["whiten"](X, eps) if eps else ns["whiten"](X)
    return (f"whiten ({n}, {D}) eps={eps} {dtype}", call)


BATTERY_08 = battery(
    *[_ln_case(s, e, k) for k, (s, e) in enumerate(itertools.product([(3, 5), (2, 3, 4), (3, 2, 2, 3), (1, 6)], [None, 0.3]))],
    *[_gn_case(s, g, e, 10 + k) for k, (s, g, e) in enumerate(
        [((3, 6, 2, 2), 3, None), ((3, 6, 2, 2), 6, 0.1), ((2, 4, 3, 3), 1, None), ((4, 8), 2, 0.5), ((4, 8), 4, None),
         ((1, 6, 2, 3), 2, None), ((2, 4, 1, 5), 2, 0.05)])],  # C divisible by G: the precondition
    _gn_case((3, 4, 2, 2), 2, None, 30, F32),
    ("output_change", _output_change_probe),
    *[_renorm_case(N, C, r, d, e, m, 40 + k) for k, (N, C, r, d, e, m) in enumerate(
        [(8, 3, 1.0, 0.0, 1e-5, 0.1), (8, 3, 3.0, 5.0, 1e-5, 0.1), (5, 2, 1.5, 0.5, 0.5, 0.3), (16, 4, 1e9, 1e9, 1e-5, 1.0),
         (4, 3, 2.0, 1.0, 1e-5, 0.0), (3, 2, 1.2, 0.2, 2.0, 0.5)])],
    *[_whiten_case(n, D, e, 60 + k) for k, (n, D, e) in enumerate([(50, 3, None), (20, 4, 0.5), (10, 2, 1e-3), (40, 5, None)])],
    _whiten_case(30, 3, None, 70, F32),
)


# ---------------------------------------------------------------------------- 09_input_normalization
def _stats_probe(ns):
    out = []
    for k, (sizes, C, dtype) in enumerate([((4, 4, 1), 3, F64), ((5,), 1, F32), ((2, 7, 3), 2, F32), ((1, 1), 4, F64)]):
        batches = [(rand((b, C, 2, 3), 80 + k * 10 + i, dtype, 1.0 + i, i - 1.0), torch.zeros(b)) for i, b in enumerate(sizes)]
        out.append(ns["channel_stats"](batches))
        out.append(ns["channel_stats"](iter(batches)))
    for k, value in enumerate((0.3, 0.55, 0.7)):  # a constant channel: its variance must not round below 0
        X = torch.rand(4, 2, 3, 3, dtype=F64, generator=gen(130 + k))
        X[:, 0] = value
        out.append(ns["channel_stats"]([(X[:2], None), (X[2:], None)]))
    return out


def _standardize_probe(ns):
    out = []
    for k, (shape, dtype, mean, std) in enumerate([
            ((2, 3, 4, 5), F32, [0.1, 0.2, 0.3], [0.5, 1.0, 2.0]), ((4, 3, 3, 3), F64, "tensor", "tensor"),
            ((3, 3, 3), F64, [0.3, -0.2, 0.7], (0.25, 2.0, 0.5)), ((2, 1, 3, 3), F32, 0.5, 0.25),
            ((1, 2, 2, 3), F64, torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5])), ((2, 3), F32, 0.5, 0.5)]):
        X = rand(shape, 100 + k, dtype)
        C = shape[-3] if len(shape) >= 3 else 1
        if mean == "tensor":
            mean, std = rand((C,), 110 + k, dtype), torch.rand(C, generator=gen(120 + k), dtype=dtype) + 0.2
        X_copy = X.clone()
        out.append((outcome(lambda ns: ns["standardize"](X, mean, std), ns), torch.equal(X, X_copy)))
    return out


BATTERY_09 = battery(("channel_stats", _stats_probe), ("standardize", _standardize_probe))


# -------------------------------------------------------------------------------- 10_distributed
# Each probe is one d2lite.map_ranks / grad_on_ranks call (a fork of 2-4 gloo processes, ~0.1-0.3 s)
# in which every rank runs many cases of the namespace's function. A rank draws the whole batch from
# the case's seed and keeps its own slice, so the reference's ranks and the mutant's see equal data.
# A mutant whose ranks disagree on the collectives raises (a rank fails or times out): a difference.
RANK_TIMEOUT = 20.0

# (shape, split sizes over the ranks, dtype, scale, shift): uneven and empty slices, 2D/3D/4D
_MOMENT_CASES = {
    2: [((12, 3, 4, 4), [5, 7], F64, 2.0, 1.0), ((9, 4), [4, 5], F64, 0.5, -1.0), ((6, 2, 5), [1, 5], F32, 3.0, 10.0),
        ((8, 3, 2, 2), [0, 8], F64, 1.0, 0.0), ((7, 2, 3), [7, 0], F32, 1.0, 2.0), ((10, 3), [3, 7], F32, 1.0, 1000.0),
        ((5, 2, 1, 3), [1, 4], F64, 4.0, -3.0), ((1, 5), [0, 1], F64, 1.0, 0.5)],
    3: [((12, 4), [5, 0, 7], F64, 0.5, -1.0), ((9, 3, 2, 2), [2, 3, 4], F32, 2.0, 1.0), ((6, 2, 3), [0, 0, 6], F64, 1.0, 5.0),
        ((11, 2, 2, 3), [4, 4, 3], F64, 3.0, 5.0), ((4, 5), [1, 1, 2], F32, 1.0, -3.0), ((9, 2), [3, 3, 3], F32, 0.1, 300.0)],
}
_EPS = [1e-5, 0.1, 1e-3, 2.0, 0.5, 0.01, 1e-5, 0.3]


def _slice(full, sizes, rank):
    return full.split(sizes)[rank].clone()


def _moments_on_rank(rank, ns, cases, group=None):
    out = {}
    for k, (shape, sizes, dtype, scale, shift) in enumerate(cases):
        X = _slice(rand(shape, 200 + k, dtype, scale, shift), sizes, rank)
        if k % 3 == 0 and X.shape[0]:  # a constant channel: its variance must not round below 0
            X[:, 0] = (0.1, 0.3, 0.7)[k % 9 // 3]
        before = X.clone()
        count, mean, var = ns["global_moments"](X, group) if group is not None else ns["global_moments"](X)
        out[f"{shape} {sizes} {dtype} shift={shift}"] = (count, mean, var, bool((var >= 0).all()), torch.equal(X, before))
    return out


def _grad_case(shape, sizes, dtype, scale, shift, eps, seed, rank):
    """This rank's (dY, X_hat) and the batch's (inv_std, gamma, count), consistent as the spec says."""
    X, dY = rand(shape, seed, dtype, scale, shift), rand(shape, seed + 1, dtype)
    C, dims = shape[1], [0, *range(2, len(shape))]
    view = (1, C) + (1,) * (len(shape) - 2)
    mean, var = X.mean(dims), X.var(dims, correction=0)
    inv_std = (var + eps).rsqrt()
    X_hat = (X - mean.view(view)) * inv_std.view(view)
    gamma = torch.rand(C, generator=gen(seed + 2), dtype=dtype) + 0.5
    return _slice(dY, sizes, rank), _slice(X_hat, sizes, rank), inv_std, gamma, X.numel() // C


def _input_grads_on_rank(rank, ns, cases, group=None):
    out = {}
    for k, (shape, sizes, dtype, scale, shift) in enumerate(cases):
        eps = _EPS[k]
        dY, X_hat, inv_std, gamma, count = _grad_case(shape, sizes, dtype, scale, shift, eps, 300 + 10 * k, rank)
        args = (dY, X_hat, inv_std, gamma, count) + ((group,) if group is not None else ())
        copies = [a.clone() for a in args[:4]]
        got = ns["sync_input_grad"](*args)
        out[f"{shape} {sizes} {dtype} eps={eps}"] = (got, all(torch.equal(a, b) for a, b in zip(args, copies)))
    return out


def _function_on_rank(rank, ns, cases, group=None):
    out = {}
    for k, (shape, sizes, dtype, scale, shift) in enumerate(cases):
        eps = None if k % 4 == 0 else _EPS[k]
        C, seed = shape[1], 400 + 10 * k
        X = _slice(rand(shape, seed, dtype, scale, shift), sizes, rank).requires_grad_()
        W = _slice(rand(shape, seed + 1, dtype), sizes, rank)
        gamma = (torch.rand(C, generator=gen(seed + 2), dtype=dtype) + 0.5).requires_grad_()
        beta = rand((C,), seed + 3, dtype, grad=True)
        args = (X, gamma, beta) + (() if eps is None else (eps,)) + (() if group is None else (group,))
        if eps is None and group is not None:
            args = (X, gamma, beta, 1e-5, group)
        Y = ns["SyncBatchNormFunction"].apply(*args)
        grads = torch.autograd.grad(Y, [X, gamma, beta], W, allow_unused=True)
        out[f"{shape} {sizes} {dtype} eps={eps}"] = (Y.detach(), Y.requires_grad, Y.grad_fn is not None, *grads)
    return out


def _on_ranks(world, body, cases):
    def call(ns):
        import d2lite
        return d2lite.map_ranks(body, list(range(world)), ns, cases, timeout=RANK_TIMEOUT)
    return call


def _in_groups_on_rank(rank, ns):
    """4 ranks in two groups, {0, 1} and {2, 3}, each its own batch: the collectives must stay in `group`."""
    import torch.distributed as dist
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, pair_rank = groups[rank // 2], rank % 2
    cases = [((7, 3, 2, 2), [3, 4], F64, 2.0, 1.0), ((6, 4), [5, 1], F64, 1.0, -2.0), ((5, 2, 3), [0, 5], F32, 1.0, 3.0)]
    mine = [(shape, sizes, dtype, scale + rank // 2, shift * (1 + rank // 2)) for shape, sizes, dtype, scale, shift in cases]
    return {"global_moments": _moments_on_rank(pair_rank, ns, mine, group),
            "sync_input_grad": _input_grads_on_rank(pair_rank, ns, mine, group),
            "SyncBatchNormFunction": _function_on_rank(pair_rank, ns, mine, group),
            "global_moments(group=None)": ns["global_moments"](rand((3, 2), 500 + rank))}


def _grad_on_ranks_probe(shape, sizes, eps, seed, dtype=F64):
    def call(ns):
        import d2lite
        C = shape[1]
        X, W = rand(shape, seed, dtype, 2.0, 1.0), rand(shape, seed + 1, dtype)
        gamma, beta = torch.rand(C, generator=gen(seed + 2), dtype=dtype) + 0.5, rand((C,), seed + 3, dtype)
        return d2lite.grad_on_ranks(ns["SyncBatchNormFunction"].apply, X.split(sizes), W.split(sizes), gamma, beta,
                                    *(() if eps is None else (eps,)), timeout=RANK_TIMEOUT)
    return (f"grad_on_ranks(SyncBatchNormFunction.apply) {shape} {sizes} {dtype} eps={eps}", call)


BATTERY_10 = battery(
    *[(f"global_moments on {w} ranks", _on_ranks(w, _moments_on_rank, cases)) for w, cases in _MOMENT_CASES.items()],
    *[(f"sync_input_grad on {w} ranks", _on_ranks(w, _input_grads_on_rank, cases)) for w, cases in _MOMENT_CASES.items()],
    *[(f"SyncBatchNormFunction forward/backward on {w} ranks", _on_ranks(w, _function_on_rank, cases))
      for w, cases in _MOMENT_CASES.items()],
    ("global_moments, sync_input_grad, SyncBatchNormFunction in two process groups of 2 (4 ranks)",
     lambda ns: __import__("d2lite").map_ranks(_in_groups_on_rank, list(range(4)), ns, timeout=RANK_TIMEOUT)),
    _grad_on_ranks_probe((12, 3, 4, 4), [5, 7], None, 600),
    _grad_on_ranks_probe((11, 4, 3), [3, 0, 8], 0.01, 610),
    _grad_on_ranks_probe((8, 5), [3, 5], 0.5, 620, F32),
)


BATTERIES = {"00_from_scratch": BATTERY_00, "01_bias": BATTERY_01, "02_learning_rates": BATTERY_02,
             "03_every_layer": BATTERY_03, "04_dropout": BATTERY_04, "05_fixed_gamma_beta": BATTERY_05,
             "06_api": BATTERY_06, "07_lite": BATTERY_07, "08_other_normalizations": BATTERY_08,
             "09_input_normalization": BATTERY_09, "10_distributed": BATTERY_10}
