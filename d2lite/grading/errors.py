"""The one exception the grading library raises; only the command line (cli.py) turns it into an exit."""


class GradingError(Exception):
    """The grading could not be done as asked (a missing course, gradebook, assignment, sandbox
    feature, or a reference solution that fails its own tests); the message says what to do."""
