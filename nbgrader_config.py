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

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearHiddenTests.begin_test_delimeter = "BEGIN HIDDEN TESTS"
c.ClearHiddenTests.end_test_delimeter = "END HIDDEN TESTS"
