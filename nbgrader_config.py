"""nbgrader configuration: the repository root is the course directory.

solutions/<assignment>/*.ipynb are the instructor's source notebooks (reference solutions and
hidden tests); `nbgrader generate_assignment batch_norm` writes the students' copies to
chapters/<assignment>/.
"""
c = get_config()  # noqa: F821 (provided by nbgrader)

c.CourseDirectory.course_id = "d2lite"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "chapters"
c.CourseDirectory.db_assignments = [dict(name="batch_norm")]
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.png", "*.csv"]

# A notebook under the grading budget runs in seconds; this only stops runaway submissions.
c.Execute.timeout = 120
c.ExecutePreprocessor.timeout = 120

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearHiddenTests.begin_test_delimeter = "BEGIN HIDDEN TESTS"
c.ClearHiddenTests.end_test_delimeter = "END HIDDEN TESTS"
