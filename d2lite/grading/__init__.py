"""Trusted grading of untrusted notebooks (instructor-only: students' notebooks never import it).

The rule that decides the shape: no point depends on anything the student's process computes or
reports about itself. The flow, one module a step (runner.py only composes them):

    submitted/ -> course (read the submission as data) -> rebuild (the instructor's cells, the
    student's answers) -> policy (a teaching aid: the code as IPython will run it) -> split (which
    cell runs where) -> sandbox + zygote (two processes per notebook) -> judge (verdicts, outputs)
    -> gradebook, autograded/, ledger, report

Why two processes (the mechanism is "remote calls by value")
------------------------------------------------------------
In the sandbox, each notebook is two forks of a warm server, as two users:

- the **oracle** (oracle.py, user `nobody`): runs the answer cells, the student's own cells and the
  instructor's setup, in an IPython shell. It never sees a test cell. It answers requests: run this
  cell; what is this name; call this, read that attribute, iterate over this. Answers are plain
  data (transport.py: numbers, strings, tensors as dtype/shape/bytes, lists/tuples/dicts/sets);
  objects that must stay there (modules, the student's classes, tensors that carry an autograd
  graph) become handles.
- the **checker** (checker.py, another uid: the oracle can neither signal, trace nor read it): runs
  the instructor's locked cells and every test cell, unchanged (nbgrader's test-cell format stays
  the one source of tests). A name the test uses that the checker lacks, or that a solution cell
  defines, is read from the oracle. Expected values, every comparison, and which cell ran, ended
  and passed are the checker's; the grader reads only the checker's records.

Arguments go to the oracle pickled (the checker is the trusted side); answers come back as JSON
read by a strict decoder with caps on size, depth and element count, so a malformed, oversized or
too-deep answer fails the check that asked for it, with the reason. A handle's equality is
identity, its truthiness is True and it has no arithmetic; the values of a tensor that carries a
graph there are computed here (only the graph, for a later backward, stays there): "equal to the
expected value", or "its difference from it is 0", is never the oracle's word.
Objects the checker sent come back as the checker's own objects; what the student's code did to
them in place (a module's parameters, mode and attributes; a tensor's values, requires_grad and
grad) is applied to the checker's copy, as if one process had run both. The checker's random
state, grad mode and default dtype travel with each request.

Alternatives weighed: a checker *kernel* beside the student's (Jupyter messaging: heavier, and the
student's kernel still had to evaluate expressions); records of values written by instrumented
test cells in the student's process (the previous design: the recorder, the records channel and
the expected values all lived where the student's code could rewrite them).

What remains reported by the student's process (and why it is acceptable, or what observes it)
----------------------------------------------------------------------------------------------
- The values its functions return, and the gradients autograd computes through the graphs they
  build: these *are* the graded behaviour. Gradients are asked of PyTorch's autograd as it was
  before any student code ran (a later rebinding of torch.autograd.grad is put aside while the
  checker's request runs); code that rewrites PyTorch's C internals could still change them, like a
  hand-written backward would.
- What the student's code did to the objects a test passed it (synced back): behaviour too.
- The type name of an object that stays there (a handle): ``isinstance`` against torch's and
  d2lite's layer classes, and ``type(x).__name__``, read it. Only layer classes are resolved (a
  handle never passes for a tensor or a built-in type).
- Whether a returned tensor still carries an autograd graph: its flags are read from the tensor's
  own C fields (a subclass's lying properties do not count), and 00's test_no_graph also measures,
  from outside the process, the memory 20 chained steps keep (``d2lite.checks.retained_memory``
  reads /proc/<oracle>/status in the checker): a kept graph grows it whatever the flags say.
- What the student's own objects do when a test calls their methods (a layer of theirs, called on
  the test's input): behaviour too; tests judge the checker's objects where they can (05's
  ``recover_identity`` must return the very layer it was given, which then runs here).
- "Does the work itself": the structural tests run the function with library normalization
  unavailable at the ATen dispatcher (every thread, every alias, every normalization kernel since
  any can stand in for another, d2lite's own batch_norm by its code object, autograd at its engine
  where a test forbids it) and judge the values that run gives, before the function has seen
  those inputs (a memo cannot replay the library).
  The block lives in the student's process: code that reaches the runtime to undo it is what the
  source policy flags, and such a finding costs exactly those structural tests.
"""
