"""`d2lite grade` on notebook 10_distributed, whose tests run the student's functions on several
forked gloo processes (d2lite.map_ranks / grad_on_ranks) inside the sandbox: with the default caps
(tasks, memory) and no network but the sandbox's own loopback. One batch grades the reference, a
correct answer written differently, the typical mistakes (each loses exactly its tests' points) and
attacks on the processes (each scores no more than its honest twin)."""
import nbformat
import pytest

from notebook_utils import ASSIGNMENT, SOLUTIONS, cell_by_id, nbgrader_env, new_course, read

from d2lite.grading import sandbox
from d2lite.grading.runner import grade

try:
    sandbox.check_features()
    MISSING = None
except sandbox.SandboxUnavailable as error:
    MISSING = str(error)

NB = "10_distributed"
POINTS = {"test_global_moments": 3, "test_sync_input_grad": 3, "test_sync_function": 3}
FULL = sum(POINTS.values())
REFERENCE = read(SOLUTIONS / f"{NB}.ipynb")
MOMENTS = cell_by_id(REFERENCE, "global_moments").source
INPUT_GRAD = cell_by_id(REFERENCE, "sync_input_grad").source
FUNCTION = cell_by_id(REFERENCE, "sync_function").source


def _edit(source, old, new):
    assert old in source, old
    return source.replace(old, new)


# correct, but not the reference's code: Chan's merge of per-process (count, mean, M2) gathered
# with all_gather_object, and the backward's sums reduced one at a time
CHAN = '''def global_moments(X, group=None):
    C = X.shape[1]
    Xc = X.transpose(0, 1).reshape(C, -1).to(torch.float64)
    n = Xc.shape[1]
    mean = Xc.mean(1) if n else torch.zeros(C, dtype=torch.float64)
    m2 = ((Xc - mean[:, None]) ** 2).sum(1)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (n, mean, m2), group=group)
    count, mu, M2 = 0, torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    for nb, mb, m2b in parts:
        if nb == 0:
            continue
        delta = mb - mu
        total = count + nb
        mu = mu + delta * nb / total
        M2 = M2 + m2b + delta ** 2 * count * nb / total
        count = total
    return count, mu.to(X.dtype), (M2 / count).to(X.dtype)
'''
SEPARATE_SUMS = _edit(INPUT_GRAD, "    dist.all_reduce(sums, group=group)\n",
                      "    first, second = sums[:C].clone(), sums[C:].clone()\n"
                      "    dist.all_reduce(first, group=group)\n"
                      "    dist.all_reduce(second, group=group)\n"
                      "    sums = torch.cat([first, second])\n")
LOCAL_MOMENTS = _edit(MOMENTS, "    dist.all_reduce(local, group=group)\n", "")
UNBIASED = _edit(MOMENTS, "    var = (local[C + 1:] / count - mean.square()).clamp(min=0)\n",
                 "    var = ((local[C + 1:] / count - mean.square()) * count / (count - 1)).clamp(min=0)\n")
LOCAL_COUNT = _edit(INPUT_GRAD, "    sum_dy, sum_dy_xhat", "    count = dY.numel() // C\n    sum_dy, sum_dy_xhat")
REDUCED_GAMMA_BETA = _edit(FUNCTION, "        return dX, (dY * X_hat).sum(dims), dY.sum(dims), None, None\n",
                           "        dgamma, dbeta = (dY * X_hat).sum(dims), dY.sum(dims)\n"
                           "        dist.all_reduce(dgamma, group=ctx.group)\n"
                           "        dist.all_reduce(dbeta, group=ctx.group)\n"
                           "        return dX, dgamma, dbeta, None, None\n")
# the attacks: the whole batch without communicating. A shard that X.split makes is a view of X's
# storage: read the other ranks' parts through it (each rank is handed its own copy).
THROUGH_STORAGE = '''def global_moments(X, group=None):
    C = X.shape[1]
    whole = torch.empty(0, dtype=X.dtype).set_(X.untyped_storage()).view(-1, *X.shape[1:]) \\
        if X.numel() else X
    dims = [0, *range(2, X.dim())]
    count = whole.numel() // C
    mean = whole.to(torch.float64).mean(dims)
    var = whole.to(torch.float64).var(dims, correction=0)
    return count, mean.to(X.dtype), var.to(X.dtype)
'''
# ... or hand every rank the whole batch, through a patch of d2lite.map_ranks that the policy's
# check of attribute writes does not see by name, with moments that never communicate
WHOLE_BATCH_PATCH = LOCAL_MOMENTS + '''

def _whole(fn, shards, *args, **kwargs):
    whole = torch.cat(list(shards))
    return [fn(whole, *args) for _ in shards]


library = d2lite
library.map_ranks = _whole
'''

# ... or read them in the memory the fork inherited from the student's process (the red team's): the
# caller's frames (through a traceback, or a generator's frame), the garbage collector (through
# os.sys.modules), or merge the ranks' local sums in the parent, through a patch of torch.load on a
# module reached by a function's return value. Each rank wipes what the grader sent before the
# student's function runs, and the path the results take back is put back as it was before each call.
FRAME_SYS = 'import os\n\ndef global_moments(X, group=None):\n    C = X.shape[1]\n    try:\n        raise ValueError("here")\n    except ValueError:\n        tb = os.sys.exc_info()[2]\n        frame = getattr(tb, "tb_frame")\n    while frame is not None and "shards" not in getattr(frame, "f_locals"):\n        frame = getattr(frame, "f_back")\n    whole = torch.cat([s if isinstance(s, torch.Tensor) else s[0] for s in getattr(frame, "f_locals")["shards"]])\n    return _whole_moments(whole, X.dtype, C)\n\ndef _whole_moments(whole, dtype, C):\n    dims = [0, *range(2, whole.dim())]\n    w = whole.to(torch.float64)\n    return whole.numel() // C, w.mean(dims).to(dtype), w.var(dims, correction=0).to(dtype)\n'
FRAME_GEN = 'def _caller_frame():\n    def walk():\n        yield getattr(getattr(holder[0], "gi_frame"), "f_back")\n    holder = [walk()]\n    return next(holder[0])\n\n\ndef global_moments(X, group=None):\n    C = X.shape[1]\n    frame = _caller_frame()\n    while frame is not None and "shards" not in getattr(frame, "f_locals"):\n        frame = getattr(frame, "f_back")\n    whole = torch.cat([s if isinstance(s, torch.Tensor) else s[0] for s in getattr(frame, "f_locals")["shards"]])\n    return _whole_moments(whole, X.dtype, C)\n\ndef _whole_moments(whole, dtype, C):\n    dims = [0, *range(2, whole.dim())]\n    w = whole.to(torch.float64)\n    return whole.numel() // C, w.mean(dims).to(dtype), w.var(dims, correction=0).to(dtype)\n'
FRAME_GEN_GRAD = 'def _caller_frame2():\n    def walk():\n        yield getattr(getattr(holder[0], "gi_frame"), "f_back")\n    holder = [walk()]\n    return next(holder[0])\n\n\ndef sync_input_grad(dY, X_hat, inv_std, gamma, count, group=None):\n    C = dY.shape[1]\n    dims = [0, *range(2, dY.dim())]\n    shape = (1, C) + (1,) * (dY.dim() - 2)\n    frame = _caller_frame2()\n    while frame is not None and "shards" not in getattr(frame, "f_locals"):\n        frame = getattr(frame, "f_back")\n    local = getattr(frame, "f_locals")\n    shards = local["shards"]\n    if isinstance(shards[0], tuple):  # map_ranks: (dY, X_hat) per rank\n        dys = torch.cat([s[0] for s in shards])\n        xhats = torch.cat([s[1] for s in shards])\n    else:  # grad_on_ranks: X per rank, dY = grad_outputs\n        xs = torch.cat(list(shards)).detach().to(torch.float64)\n        mean = xs.mean(dims)\n        xhats = ((xs - mean.view(shape)) * inv_std.view(shape)).to(dY.dtype)\n        dys = torch.cat(list(local["grad_outputs"])).to(dY.dtype)\n    sum_dy = dys.sum(dims).view(shape)\n    sum_dy_xhat = (dys * xhats).sum(dims).view(shape)\n    return (gamma * inv_std).view(shape) * (dY - sum_dy / count - X_hat * sum_dy_xhat / count)\n'
PARENT_MERGE = 'def global_moments(X, group=None):\n    C = X.shape[1]\n    dims = [0, *range(2, X.dim())]\n    return [X.numel() // C, X.sum(dims, dtype=torch.float64), X.to(torch.float64).square().sum(dims),\n            "local sums", dist.get_world_size(group), str(X.dtype)]\n\n\ndef _torch_module():\n    return torch.nn.functional.torch\n\n\n_t = _torch_module()\n_plain_load = _t.load\n_arrived = []\n\n\ndef _merging_load(*args, **kwargs):\n    value = _plain_load(*args, **kwargs)\n    if isinstance(value, list) and len(value) == 6 and value[3] == "local sums":\n        _arrived.append(value)\n        if len(_arrived) == value[4]:\n            count = sum(v[0] for v in _arrived)\n            mean = sum(v[1] for v in _arrived) / count\n            var = (sum(v[2] for v in _arrived) / count - mean.square()).clamp(min=0)\n            dtype = torch.float32 if value[5] == "torch.float32" else torch.float64\n            for v in _arrived:\n                v[:] = [count, mean.to(dtype), var.to(dtype)]\n            _arrived.clear()\n    return value\n\n\n_t.load = _merging_load\n'
GC_MOMENTS = 'import os\n\n\ndef global_moments(X, group=None):\n    C = X.shape[1]\n    best = [X]\n    for obj in os.sys.modules["gc"].get_objects():\n        if type(obj) is list and obj and all(isinstance(s, torch.Tensor) for s in obj) \\\n                and all(s.dim() == X.dim() and s.shape[1:] == X.shape[1:] and s.dtype == X.dtype for s in obj) \\\n                and any(s.shape == X.shape and torch.equal(s.detach(), X.detach()) for s in obj) \\\n                and sum(s.numel() for s in obj) > sum(s.numel() for s in best):\n            best = obj\n    whole = torch.cat([s.detach() for s in best])\n    return _whole_moments(whole, X.dtype, C)\n\ndef _whole_moments(whole, dtype, C):\n    dims = [0, *range(2, whole.dim())]\n    w = whole.to(torch.float64)\n    return whole.numel() // C, w.mean(dims).to(dtype), w.var(dims, correction=0).to(dtype)\n'
LOCAL_INPUT_GRAD = _edit(INPUT_GRAD, "    dist.all_reduce(sums, group=group)\n", "")

# student: (cell answers replaced, score)
CASES = {
    "reference": ({}, FULL),
    "chan_merge": ({"global_moments": CHAN, "sync_input_grad": SEPARATE_SUMS}, FULL),
    "local_moments": ({"global_moments": LOCAL_MOMENTS}, POINTS["test_sync_input_grad"]),
    "unbiased_variance": ({"global_moments": UNBIASED}, POINTS["test_sync_input_grad"]),
    "local_count": ({"sync_input_grad": LOCAL_COUNT}, POINTS["test_global_moments"]),
    "reduced_gamma_beta": ({"sync_function": REDUCED_GAMMA_BETA}, FULL - POINTS["test_sync_function"]),
    "through_storage": ({"global_moments": THROUGH_STORAGE}, POINTS["test_sync_input_grad"]),
    # every test runs the processes through the library, which the patch reached: all lost
    "whole_batch_patch": ({"global_moments": WHOLE_BATCH_PATCH}, 0),
    "local_input_grad": ({"sync_input_grad": LOCAL_INPUT_GRAD}, POINTS["test_global_moments"]),
}
# the attacks score no more than their honest twin (the mistake they hide)
ATTACKS = {
    "frame_through_traceback": ({"global_moments": FRAME_SYS}, "local_moments"),
    "frame_of_a_generator": ({"global_moments": FRAME_GEN}, "local_moments"),
    "frame_input_grad": ({"sync_input_grad": FRAME_GEN_GRAD}, "local_input_grad"),
    "garbage_collector": ({"global_moments": GC_MOMENTS}, "local_moments"),
    "merge_in_the_parent": ({"global_moments": PARENT_MERGE}, "local_moments"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if MISSING:
        pytest.skip(f"sandbox unavailable: {MISSING}")
    root = tmp_path_factory.mktemp("course")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", nbgrader_env()["PATH"])
        new_course(root, tmp_path_factory.mktemp("exchange"))
    for student, (answers, _) in {**CASES, **ATTACKS}.items():
        nb = read(SOLUTIONS / f"{NB}.ipynb")
        for grade_id, source in answers.items():
            cell_by_id(nb, grade_id).source = source
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(nb, str(folder / f"{NB}.ipynb"))
    rows = grade(root, ASSIGNMENT, notebooks=[NB], echo=lambda *a: None)  # the default caps
    return {r.student: r for r in rows if r.notebook == NB}


@pytest.mark.parametrize("student", list(CASES))
def test_each_submission_of_notebook_10_gets_its_exact_score(graded, student):
    row = graded[student]
    assert row.max_score == FULL
    assert row.score == CASES[student][1], f"{student}: {row.score}/{row.max_score}: {row.reason}"


def test_the_ranks_ran_within_the_default_caps(graded):
    """The reference's processes (3 ranks, their gloo and torch threads) fit the default task cap,
    and nothing was killed."""
    row = graded["reference"]
    assert "killed" not in (row.reason or "") and "cap" not in (row.reason or ""), row.reason
    assert 0 < row.seconds < sandbox.Limits().wall, row.seconds


def test_the_patch_is_reported(graded):
    assert "flagged (machinery)" in graded["whole_batch_patch"].reason, graded["whole_batch_patch"].reason


@pytest.mark.parametrize("student", list(ATTACKS))
def test_no_attack_on_the_ranks_scores_more_than_its_honest_twin(graded, student):
    row, twin = graded[student], graded[ATTACKS[student][1]]
    assert row.score <= twin.score, f"{student}: {row.score} > {twin.score} ({twin.student}): {row.reason}"
