"""The course in a real browser: a student's and an instructor's path through JupyterLab.

Each test drives Chromium (Debian's, through Playwright's ``executable_path``) against a `jupyter
lab` that the test starts on 127.0.0.1 with a token, in a temporary copy of the course with its own
config, settings and workspace directories. JupyterLab 4 renders notebooks windowed, so results
are read from the saved notebook, the gradebook and the files on disk; the page is used for what a
user does and sees. Screenshots of every step go to the test's temporary directory (and, with
D2LITE_DOCS_SCREENSHOTS=1, the two in the README to docs/).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser_utils import CHROMIUM, Lab, LabServer, copy_release, missing
from notebook_utils import (ASSIGNMENT, CHAPTERS, NOTEBOOKS, ROOT, SOLUTIONS, cell_by_id, nbgrader_env, nbgrader_meta,
                            new_course, read)
from test_trusted_grading import MISSING as GRADER_MISSING

MISSING = missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"browser unavailable: {MISSING}")

DOCS = ROOT / "docs"
VIEWPORT = {"width": 1400, "height": 900}


def solution_body(notebook: str, grade_id: str) -> list[str]:
    """The lines between BEGIN and END SOLUTION of a reference solution cell: what a student types."""
    lines = cell_by_id(read(SOLUTIONS / f"{notebook}.ipynb"), grade_id).source.splitlines()
    begin = next(i for i, l in enumerate(lines) if "### BEGIN SOLUTION" in l)
    end = next(i for i, l in enumerate(lines) if "### END SOLUTION" in l)
    return lines[begin + 1:end]


def errors(cell) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.get("outputs", []) if o.output_type == "error"]


def to_docs(path, name):
    if os.environ.get("D2LITE_DOCS_SCREENSHOTS"):
        shutil.copy(path, DOCS / name)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # --no-sandbox: Chromium's own sandbox refuses to start as root (CI); the pages are ours
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def student(tmp_path, browser):
    """A student's JupyterLab on a copy of the released chapter."""
    work = tmp_path / "student"
    work.mkdir()
    copy_release(work, CHAPTERS)
    server = LabServer(work, tmp_path / "lab-student",
                       env={"D2LITE_BUDGET": "grading", "OMP_NUM_THREADS": "1"})
    with server:
        page = browser.new_page(viewport=VIEWPORT)
        yield Lab(page, server, tmp_path / "screenshots"), work / "batch_norm"
        page.close()


def fill_solution(lab, grade_id: str, notebook: str, signature: str):
    """Types the reference body into the student's stub cell of ``signature`` through the editor:
    the cursor goes to the stub's last line, the two stub lines are selected, the body is typed."""
    cell = lab.cell(signature, "raise NotImplementedError()")
    cell.scroll_into_view_if_needed()
    cell.locator(".cm-line", has_text="raise NotImplementedError()").click()
    keyboard = lab.page.keyboard
    keyboard.press("End")
    keyboard.press("Shift+ArrowUp")  # onto "# YOUR CODE HERE"
    keyboard.press("Shift+Home")     # from the start of its text
    lab.type_lines(solution_body(notebook, grade_id))
    keyboard.press("Escape")         # back to command mode
    return lab.cell(signature)


def answer_question(lab, text: str) -> bool:
    """Types ``text`` over the first "YOUR ANSWER HERE" of the open notebook; False if none is left."""
    cell = lab.page.locator(".jp-MarkdownCell", has_text="YOUR ANSWER HERE").first
    if not cell.count():
        return False
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-MarkdownOutput").dblclick()  # a rendered cell opens its editor
    lab.replace_line(cell, "YOUR ANSWER HERE", text)
    lab.page.keyboard.press("Control+Enter")  # renders it again
    return True


def answer_questions(lab, text: str) -> int:
    """Types ``text`` over every "YOUR ANSWER HERE" of the open notebook's written answers."""
    count = 0
    while answer_question(lab, text):
        count += 1
    return count


def run_all(lab, path, timeout=180):
    """Run → Run All Cells; waits until the first code cell has run again and the kernel is idle,
    then saves and returns the notebook as saved."""
    first = lab.page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").first
    before = first.inner_text()
    lab.menu("Run", "Run All Cells")
    deadline = time.monotonic() + 60
    while (now := first.inner_text()) == before or "*" in now:
        assert time.monotonic() < deadline, f"the first cell did not run: {now!r}"
        lab.page.wait_for_timeout(200)
    lab.wait_kernel_idle(timeout=timeout)
    return lab.save(path)


def validate(lab):
    lab.page.locator(".jp-NotebookPanel-toolbar").get_by_text("Validate", exact=True).first.click()
    box, text = lab.dialog(timeout=180)
    return box, text


STUDENT_PATHS = {
    # notebook: (its solution cells (grade id, the line that starts them), the typical mistake
    # (in which cell, the line, what the student writes instead), the test cell that must fail,
    # what its message must say)
    "00_from_scratch": (
        [("batch_norm_impl", "def batch_norm("), ("gamma_beta_grads", "def gamma_beta_grads(")],
        ("def batch_norm(", "var = ((X - mean.view(shape))", "var = X.var(dim=dims)"),
        "test_train_2d", "X.var(dim=0) divides by N - 1"),
    "02_learning_rates": (  # an experiment's helper: when has a training run failed?
        [("failed", "def failed("), ("largest_working_lr", "def largest_working_lr(")],
        ("def failed(", "if history.final.test_acc <= chance + margin:",
         "if history.final.test_acc <= chance:"),
        "test_failed", "the final test accuracy 0.12 <= 0.1 + 0.05"),
}


@pytest.mark.parametrize("notebook", list(STUDENT_PATHS))
def test_student_path(student, notebook):
    """Type the solutions, Run All, Validate; then one typical mistake: the hint, and Validate
    names the failing cell."""
    solutions, (where, old, new), failing_id, fragment = STUDENT_PATHS[notebook]
    lab, work = student
    path = work / f"{notebook}.ipynb"
    lab.open_notebook(f"batch_norm/{notebook}.ipynb")
    lab.shot(f"{notebook}-0-opened")

    for grade_id, signature in solutions:
        cell = fill_solution(lab, grade_id, notebook, signature)
        lab.shot(f"{notebook}-1-typed-{grade_id}", cell)
    questions = sum(1 for c in read(CHAPTERS / f"{notebook}.ipynb").cells
                    if c.cell_type == "markdown" and "YOUR ANSWER HERE" in c.source)
    assert answer_questions(lab, "Batch statistics are noisy; the running ones are estimates.") == questions
    nb = lab.save(path)
    for grade_id, _ in solutions:  # what the keys made is the solution, nothing else
        typed = cell_by_id(nb, grade_id).source
        assert "\n".join(solution_body(notebook, grade_id)) in typed, typed
        assert "NotImplementedError" not in typed, typed

    nb = run_all(lab, path)
    tests = [c for c in nb.cells if nbgrader_meta(c).get("grade") and c.cell_type == "code"]
    assert tests
    for test in tests:  # every visible test ran and passed
        assert test.execution_count and not errors(test), (nbgrader_meta(test)["grade_id"], errors(test))
    lab.shot(f"{notebook}-2-tests-pass")

    box, text = validate(lab)
    assert "Success! Your notebook passes all the tests." in text, text
    lab.shot(f"{notebook}-3-validate-success", box)
    lab.close_dialog()

    lab.replace_line(lab.cell(where), old, new)
    nb = run_all(lab, path)
    assert new.strip() in cell_by_id(nb, solutions[[s for _, s in solutions].index(where)][0]).source
    message = "\n".join(errors(cell_by_id(nb, failing_id)))
    assert "expected" in message and "got" in message, message
    assert fragment in message, message
    failing = lab.cell(cell_by_id(nb, failing_id).source.splitlines()[0])
    failing.scroll_into_view_if_needed()
    output = failing.locator(".jp-OutputArea")
    assert fragment in output.inner_text()
    shot = lab.shot(f"{notebook}-4-failing-hint", output)
    if notebook == "00_from_scratch":
        to_docs(shot, "student-hint.png")

    box, text = validate(lab)
    assert "The following cell failed" in text, text
    assert cell_by_id(nb, failing_id).source.splitlines()[0] in text, text  # the failing cell, named
    lab.shot(f"{notebook}-5-validate-fails", box)
    lab.close_dialog()


# -- the exchange and the instructor ----------------------------------------------------------

class Course:
    """A course directory with the assignment generated, an exchange, and two JupyterLabs: the
    instructor's on the course directory and a student's on an empty home directory, both
    configured for the exchange the way a shared machine's /etc/jupyter/nbgrader_config.py is."""

    def __init__(self, base: Path, browser):
        self.base = base
        self.exchange = base / "exchange"
        self.exchange.mkdir()
        self.exchange.chmod(0o777)  # students write their submissions into it
        self.root = base / "course"
        self.root.mkdir()
        self.api = new_course(self.root, self.exchange)
        config = f"c.Exchange.root = {str(self.exchange)!r}\nc.CourseDirectory.course_id = 'd2lite'\n"
        env = {"D2LITE_BUDGET": "grading", "OMP_NUM_THREADS": "1"}
        self.instructor = LabServer(self.root, base / "lab-instructor", nbgrader_config=config, env=env).start()
        self.home = base / "student"
        self.home.mkdir()
        self.student = LabServer(self.home, base / "lab-student", nbgrader_config=config, env=env).start()
        shots = base / "screenshots"
        self.teacher_lab = Lab(browser.new_page(viewport=VIEWPORT), self.instructor, shots)
        self.student_lab = Lab(browser.new_page(viewport=VIEWPORT), self.student, shots)
        self.collected = None

    def close(self):
        for lab in (self.teacher_lab, self.student_lab):
            lab.page.close()
        for server in (self.instructor, self.student):
            server.stop()

    def formgrader(self):
        """The Formgrader panel of the instructor's JupyterLab (Nbgrader → Formgrader): its frame."""
        lab = self.teacher_lab
        lab.page.goto(self.instructor.link("lab", reset=None))
        lab.page.locator(".jp-LabShell").wait_for()
        lab.menu("Nbgrader", "Formgrader")
        frame = lab.page.frame_locator("iframe[src*='formgrader']")
        frame.locator("#main-table tr", has_text=ASSIGNMENT).wait_for(timeout=60_000)
        return frame

    def formgrader_action(self, frame, column: str, success: str):
        """Clicks the icon in ``column`` of the assignment's row and waits for nbgrader's answer."""
        frame.locator(f"#main-table tr:has-text('{ASSIGNMENT}') td.{column} a").click()
        modal = frame.locator("#success-modal, #error-modal")
        modal.wait_for(timeout=120_000)
        ok = modal.locator(".modal-footer button", has_text="OK").first
        ok.wait_for(state="visible")
        self.teacher_lab.page.wait_for_timeout(400)  # bootstrap's fade-in, for the screenshot
        text = modal.inner_text()
        assert success in text, text
        self.teacher_lab.shot(f"formgrader-{column}", self.teacher_lab.page)
        ok.click()
        modal.wait_for(state="detached")
        return text

    def assignment_list(self):
        """The student's Assignments panel (Nbgrader → Assignment List)."""
        lab = self.student_lab
        lab.page.goto(self.student.link("lab", reset=None))
        lab.page.locator(".jp-LabShell").wait_for()
        lab.menu("Nbgrader", "Assignment List")
        return lab.page

    def exchange_flow(self):
        """Release (Formgrader) → fetch, fill in, submit (Assignments panel) → collect (Formgrader).
        Returns the collected submission's directory; done once per Course."""
        if self.collected:
            return self.collected
        frame = self.formgrader()
        self.teacher_lab.shot("formgrader-opened")
        self.formgrader_action(frame, "release", f"Successfully released '{ASSIGNMENT}'")
        assert (self.exchange / "d2lite" / "outbound" / ASSIGNMENT / "00_from_scratch.ipynb").is_file()

        page = self.assignment_list()
        released = page.locator("#released_assignments_list .list_item", has_text=ASSIGNMENT)
        released.get_by_role("button", name="Fetch").click()
        fetched = page.locator("#fetched_assignments_list .list_item", has_text=ASSIGNMENT)
        fetched.wait_for(timeout=60_000)
        self.student_lab.shot("assignments-fetched")
        work = self.home / ASSIGNMENT
        assert sorted(p.stem for p in work.glob("*.ipynb")) == sorted(NOTEBOOKS)

        # the student does part of 00: batch_norm with one mistake, one written answer
        lab = self.student_lab
        lab.open_notebook(f"{ASSIGNMENT}/00_from_scratch.ipynb")
        cell = fill_solution(lab, "batch_norm_impl", "00_from_scratch", "def batch_norm(")
        lab.replace_line(cell, "new_var = (1 - momentum) * moving_var",
                         "new_var = (1 - momentum) * moving_var + momentum * var")  # biased
        assert answer_question(lab, WRITTEN_ANSWER)
        lab.save(work / "00_from_scratch.ipynb")
        lab.shot("exchange-filled-in")

        page = self.assignment_list()
        fetched = page.locator("#fetched_assignments_list .list_item", has_text=ASSIGNMENT)
        fetched.get_by_role("button", name="Submit").click()
        page.locator("#submitted_assignments_list .list_item", has_text=ASSIGNMENT).first.wait_for(timeout=60_000)
        self.student_lab.shot("assignments-submitted")
        inbound = list((self.exchange / "d2lite" / "inbound").iterdir())
        assert len(inbound) == 1, inbound

        frame = self.formgrader()
        self.formgrader_action(frame, "collect", f"Successfully collected submissions of '{ASSIGNMENT}'")
        submitted = list((self.root / "submitted").glob(f"*/{ASSIGNMENT}"))
        assert len(submitted) == 1, submitted
        self.collected = submitted[0]
        return self.collected


WRITTEN_ANSWER = "The running statistics would keep every training step's autograd graph alive."


@pytest.fixture(scope="module")
def course(tmp_path_factory, browser):
    base = tmp_path_factory.mktemp("course")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", nbgrader_env()["PATH"])  # generate_assignment runs alembic
        course = Course(base, browser)
    yield course
    course.close()


def test_exchange_release_fetch_submit_collect(course):
    submission = course.exchange_flow()
    nb = read(submission / "00_from_scratch.ipynb")
    assert "momentum * var\n" in cell_by_id(nb, "batch_norm_impl").source + "\n"
    assert WRITTEN_ANSWER in cell_by_id(nb, "why_no_graph").source
    assert (submission / "timestamp.txt").is_file()


def reference_lines(notebook: str) -> set[str]:
    """The lines of the reference solutions and model answers of ``notebook`` (long enough to
    be the solution's own, not a shared `return Y`)."""
    lines = set()
    for cell in read(SOLUTIONS / f"{notebook}.ipynb").cells:
        text = cell.source
        while "### BEGIN SOLUTION" in text:
            text = text.split("### BEGIN SOLUTION", 1)[1]
            body, _, text = text.partition("### END SOLUTION")
            lines |= {l.strip() for l in body.splitlines() if len(l.strip()) >= 30}
    return lines


def test_instructor_grades_and_student_reads_feedback(course):
    if GRADER_MISSING:
        pytest.skip(f"d2lite grade's sandbox unavailable: {GRADER_MISSING}")
    submission = course.exchange_flow()
    student = submission.parent.name
    graded = subprocess.run([str(Path(sys.executable).parent / "d2lite"), "grade", ASSIGNMENT,
                             "--course", str(course.root), "--no-progress"],
                            capture_output=True, text=True, timeout=600, env=nbgrader_env())
    assert graded.returncode == 0, graded.stdout[-3000:] + graded.stderr[-3000:]

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course.root / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook("00_from_scratch", ASSIGNMENT, student)
        auto = nb.score
        submission_score = gb.find_submission(ASSIGNMENT, student)
        shown = f"{submission_score.score:g} / {submission_score.max_score:g}"
        failed = {g.name for g in nb.grades if g.cell.__class__.__name__ == "GradeCell"
                  and g.auto_score is not None and g.auto_score < g.max_score}
    assert "test_running_var" in failed and "test_gamma_beta_grads" in failed, failed
    assert "test_train_2d" not in failed, failed

    # the Formgrader shows the autograded score of the submission
    frame = course.formgrader()
    frame.locator("#main-table tr", has_text=ASSIGNMENT).locator("td.num-submissions a").click()
    row = frame.locator("#main-table tr", has_text=student)
    row.wait_for(timeout=60_000)
    assert row.locator("td.score").inner_text().strip() == shown, (shown, row.inner_text())
    shot = course.teacher_lab.shot("formgrader-submissions")
    to_docs(shot, "formgrader.png")

    # Manual Grading: the written answer gets 1.5 of its 2 points, saved by the Formgrader
    frame.get_by_role("link", name="Manual Grading").click()
    frame.get_by_role("link", name=ASSIGNMENT, exact=True).click()
    frame.get_by_role("link", name="00_from_scratch", exact=True).click()
    frame.get_by_role("link", name="Submission #1").click()
    score = frame.locator("input.score#why_no_graph")
    score.wait_for(timeout=60_000)
    assert WRITTEN_ANSWER in frame.locator("body").inner_text()
    score.fill("1.5")
    score.press("Tab")  # the Formgrader saves on change
    course.teacher_lab.page.wait_for_timeout(1500)
    course.teacher_lab.shot("formgrader-manual-grade")
    with Gradebook(f"sqlite:///{course.root / 'gradebook.db'}") as gb:
        grade = gb.find_grade("why_no_graph", "00_from_scratch", ASSIGNMENT, student)
        assert grade.manual_score == 1.5
        total = gb.find_submission_notebook("00_from_scratch", ASSIGNMENT, student).score
    assert total == auto + 1.5

    # feedback: generated and released from the Formgrader, fetched from the Assignments panel
    frame = course.formgrader()
    course.formgrader_action(frame, "generate-feedback", f"Successfully generated feedback of '{ASSIGNMENT}'")
    course.formgrader_action(frame, "release-feedback", f"Successfully released feedback of '{ASSIGNMENT}'")
    page = course.assignment_list()
    page.locator("#submitted_assignments_list .list_item", has_text=ASSIGNMENT).get_by_role(
        "button", name="Fetch Feedback").first.click()
    deadline = time.monotonic() + 60
    while not (found := list(course.home.glob(f"{ASSIGNMENT}/feedback/*/00_from_scratch.html"))):
        assert time.monotonic() < deadline, "no feedback fetched"
        time.sleep(0.5)
    course.student_lab.shot("assignments-feedback-fetched")
    relative = found[0].relative_to(course.home)
    page.goto(course.student.link(f"files/{relative}"))
    text = page.locator("body").inner_text()
    course.student_lab.shot("feedback")
    assert f"Score: {total:.1f} / 20.0" in text or f"Score: {total:g} / 20.0" in text, text[:500]
    assert "moving_var is off: did you use the biased variance?" in text  # the failed check's hint
    assert "NotImplementedError" in text                                   # the stub left alone
    typed = read(submission / "00_from_scratch.ipynb")
    student_text = "\n".join(c.source for c in typed.cells)
    leaked = [l for l in reference_lines("00_from_scratch") if l in text and l not in student_text]
    assert not leaked, leaked
