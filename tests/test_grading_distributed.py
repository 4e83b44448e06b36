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
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    if MISSING:
        pytest.skip(f"sandbox unavailable: {MISSING}")
    root = tmp_path_factory.mktemp("course")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", nbgrader_env()["PATH"])
        new_course(root, tmp_path_factory.mktemp("exchange"))
    for student, (answers, _) in CASES.items():
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
