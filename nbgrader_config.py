"""nbgrader configuration: the repository root is the course directory.

solutions/<assignment>/*.ipynb are the instructor's source notebooks (reference solutions and
hidden tests); `nbgrader generate_assignment batch_norm` writes the students' copies to
chapters/<assignment>/.
"""
import os

c = get_config()  # noqa: F821 (provided by nbgrader)

# Graded notebooks train tiny models: one intra-op thread per kernel is faster than two fighting
# over two cores (a whole submission autograded in 100 s instead of 201 s on this project's 2-core
# machine), and several `nbgrader autograde --student ...` can run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")

c.CourseDirectory.course_id = "d2lite"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "chapters"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.png", "*.csv"]

# A notebook under the grading budget runs in seconds; this only stops runaway submissions.
c.Execute.timeout = 120
c.ExecutePreprocessor.timeout = 120

# The exchange: how `release_assignment`, the students' fetch and submit (JupyterLab's Nbgrader →
# Assignment List), `collect` and `release_feedback` move notebooks. It is a directory every user
# of the machine can write to, nbgrader's default /srv/nbgrader/exchange. It is the machine's
# setting, not the course's, so it is not set here. Create it once, as root:
#     mkdir -p /srv/nbgrader/exchange && chmod 0777 /srv/nbgrader/exchange
# Until it exists the Formgrader warns and Release / Collect are unavailable. Students do not have
# this course directory, so the settings they need go in a config that every account reads too,
# /etc/jupyter/nbgrader_config.py on a shared machine (or the image of a JupyterHub's single-user
# servers, with the exchange a volume mounted in all of them):
#     c = get_config()
#     c.CourseDirectory.course_id = "d2lite"
#     c.Exchange.root = "/srv/nbgrader/exchange"
# Several courses on one machine: add c.Exchange.path_includes_course = True to both configs.
# Submissions land in submitted/<student>/batch_norm/, the student id being the account's name
# (on JupyterHub, the hub's user name). tests/test_browser.py runs this whole path in Chromium.

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearHiddenTests.begin_test_delimeter = "BEGIN HIDDEN TESTS"
c.ClearHiddenTests.end_test_delimeter = "END HIDDEN TESTS"

# Feedback shows each failed test's message (and its line, unless hidden), never the hidden tests'
# code: nbgrader's generate_feedback renders the autograded notebooks as they are, hidden tests
# included (nbgrader #917, #1363), so the feedback clears them as generate_assignment does.
# Formgrader's manual grading still shows the instructor the whole test cell.
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, GetGrades  # noqa: E402

c.GenerateFeedback.preprocessors = [GetGrades, ClearHiddenTests, CSSHTMLHeaderPreprocessor]
