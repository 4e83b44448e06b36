"""Trusted grading of untrusted notebooks (instructor-only: students' notebooks never import it).

submitted/ -> rebuild (the instructor's cells, the student's answers) -> sandbox (the notebook runs
as probes that record the values each test checks) -> judge (the records against the reference
solution's, plus checks of the student's source) -> nbgrader's gradebook, autograded/, the report.
"""
