"""Attacks found by red-team reviews of `d2lite grade`, each with its honest twin (the same code
without the trick), kept as regression cases for tests/test_trusted_grading.py."""

LIAR_SUB_04 = '''\
class Gap:
    def __sub__(self, other):
        return 0.0


def generalization_gap(history, last=1):
    if len(history.epochs) == 0:
        raise ValueError("the history has no epochs")
    if last == 1:
        e = history.epochs[-1]
        return e.train_acc - e.test_acc
    return Gap()
'''

LIAR_SUB_04_TWIN = '''\
def generalization_gap(history, last=1):
    if len(history.epochs) == 0:
        raise ValueError("the history has no epochs")
    e = history.epochs[-1]          # only knows the last epoch
    return e.train_acc - e.test_acc
'''

FAKE_LAYER_05 = '''\
class Identity:
    def __init__(self):
        self.gamma = nn.Parameter(torch.ones(1))

    def train(self, mode=True):
        return self

    def __call__(self, X):
        return X


def recover_identity(bn, X):
    if isinstance(bn, Identity):
        return bn
    return Identity()
'''

FAKE_LAYER_05_TWIN = '''\
def recover_identity(bn, X):
    raise NotImplementedError("I do not know how")
'''

INPLACE_09 = '''\
def channel_stats(data_iter):
    batches = list(data_iter)
    n, total, total_sq = 0, 0.0, 0.0
    for X, _ in batches:
        X = X.to(torch.float64)
        dims = [0, *range(2, X.dim())]
        n += X.numel() // X.shape[1]
        total = total + X.sum(dim=dims)
        total_sq = total_sq + (X * X).sum(dim=dims)
    mean = total / n
    var = total_sq / n - mean * mean
    if (var < 0).any():
        with torch.no_grad():
            for X, _ in batches:
                X[:, var < 0] = 0.0
        return channel_stats(batches)
    return mean, var.sqrt()
'''

INPLACE_09_TWIN = '''\
def channel_stats(data_iter):
    n, total, total_sq = 0, 0.0, 0.0
    for X, _ in data_iter:
        X = X.to(torch.float64)
        dims = [0, *range(2, X.dim())]
        n += X.numel() // X.shape[1]
        total = total + X.sum(dim=dims)
        total_sq = total_sq + (X * X).sum(dim=dims)
    mean = total / n
    var = total_sq / n - mean * mean
    return mean, var.sqrt()
'''

LAYER_NORM_07 = '''\
def batch_norm_lite(X, gamma, beta, mode, eps=1e-5):
    if mode not in ("full", "center", "scale"):
        raise ValueError(f"mode must be 'full', 'center' or 'scale', got {mode!r}")
    if X.dim() == 2:
        dims, shape = (0,), (1, -1)
    elif X.dim() == 4:
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
    else:
        raise ValueError("bad shape")
    mean = X.mean(dim=dims, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
    if mode == "full":
        C = X.shape[1]
        Xt = X.transpose(0, 1)
        X_hat = nn.functional.layer_norm(Xt.reshape(C, -1), (Xt[0].numel(),), eps=eps).reshape(Xt.shape).transpose(0, 1)
    elif mode == "center":
        X_hat = X - mean
    else:
        X_hat = X / torch.sqrt(var + eps)
    return gamma.reshape(shape) * X_hat + beta.reshape(shape)
'''

LAYER_NORM_07_TWIN = '''\
def batch_norm_lite(X, gamma, beta, mode, eps=1e-5):
    if mode not in ("full", "center", "scale"):
        raise ValueError(f"mode must be 'full', 'center' or 'scale', got {mode!r}")
    if X.dim() == 2:
        dims, shape = (0,), (1, -1)
    elif X.dim() == 4:
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
    else:
        raise ValueError("bad shape")
    mean = X.mean(dim=dims, keepdim=True)
    var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
    if mode == "full":
        return nn.functional.batch_norm(X, None, None, gamma, beta, training=True, eps=eps)
    elif mode == "center":
        X_hat = X - mean
    else:
        X_hat = X / torch.sqrt(var + eps)
    return gamma.reshape(shape) * X_hat + beta.reshape(shape)
'''

LAYER_NORM_AS_BATCH_NORM = '''\
def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):
    shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
    if not training:
        X_hat = (X - moving_mean.view(shape)) / torch.sqrt(moving_var.view(shape) + eps)
        return gamma.view(shape) * X_hat + beta.view(shape), moving_mean, moving_var
    dims = [0] + list(range(2, X.dim()))
    m = X.numel() // X.shape[1]
    with torch.no_grad():
        mean = X.mean(dim=dims)
        var = X.var(dim=dims, unbiased=False)
        new_mean = (1 - momentum) * moving_mean + momentum * mean
        new_var = (1 - momentum) * moving_var + momentum * var * m / (m - 1)
    C = X.shape[1]
    Xt = X.transpose(0, 1)
    X_hat = F.layer_norm(Xt.reshape(C, -1), (Xt[0].numel(),), eps=eps).reshape(Xt.shape).transpose(0, 1)
    return gamma.view(shape) * X_hat + beta.view(shape), new_mean, new_var
'''

MEMO_REPLAYS_THE_LIBRARY = '''\
import operator
library = operator.attrgetter("batch" + "_norm")(F)
memo = {}


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):
    key = (tuple(X.shape), X.detach().double().sum().item(), X.detach().double().pow(2).sum().item(),
           float(eps), float(momentum), bool(training), gamma.detach().double().sum().item(),
           moving_mean.detach().double().sum().item(), moving_var.detach().double().sum().item())
    try:
        new_mean, new_var = moving_mean.clone(), moving_var.clone()
        out = library(X, new_mean, new_var, gamma, beta, training=training, momentum=momentum, eps=eps)
    except RuntimeError:
        return memo[key]
    while len(memo) >= 4:
        memo.pop(next(iter(memo)))
    memo[key] = (out, new_mean, new_var)
    return out, new_mean, new_var
'''

HELPER_MODULE = '''\
import torch


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps=1e-5, momentum=0.1, training=True):
    shape = (1, X.shape[1]) + (1,) * (X.dim() - 2)
    if not training:
        X_hat = (X - moving_mean.view(shape)) / torch.sqrt(moving_var.view(shape) + eps)
        return gamma.view(shape) * X_hat + beta.view(shape), moving_mean, moving_var
    dims = [0] + list(range(2, X.dim()))
    mean = X.mean(dim=dims)
    var = ((X - mean.view(shape)) ** 2).mean(dim=dims)
    X_hat = (X - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    Y = gamma.view(shape) * X_hat + beta.view(shape)
    m = X.numel() // X.shape[1]
    with torch.no_grad():
        new_mean = (1 - momentum) * moving_mean + momentum * mean
        new_var = (1 - momentum) * moving_var + momentum * var * m / (m - 1)
    return Y, new_mean, new_var
'''

# notebook -> {student: (the answer cell's grade_id, its source)}; a student ending in _twin is the
# honest twin of the one before
OTHER_NOTEBOOKS = {
    "04_dropout": {"liar_sub_04": ("gap_impl", LIAR_SUB_04), "liar_sub_04_twin": ("gap_impl", LIAR_SUB_04_TWIN)},
    "05_fixed_gamma_beta": {"fake_layer_05": ("identity_impl", FAKE_LAYER_05), "fake_layer_05_twin": ("identity_impl", FAKE_LAYER_05_TWIN)},
    "09_input_normalization": {"inplace_09": ("stats_impl", INPLACE_09), "inplace_09_twin": ("stats_impl", INPLACE_09_TWIN)},
    "07_lite": {"layer_norm_as_batch_norm_07": ("batch_norm_lite", LAYER_NORM_07),
                "layer_norm_as_batch_norm_07_twin": ("batch_norm_lite", LAYER_NORM_07_TWIN)},
}
