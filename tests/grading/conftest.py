"""The grader's steps, each tested on its own without a sandbox."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebook_utils, test_grading
