"""The ranks of a test's own process group, each in a new process.

Started with "spawn": a forked child would inherit the test process's default process group (an in-process
trainer run keeps its one-rank group until the session ends) and could not start its own. Released together
once every child has imported its modules, so that a short process-group timeout in a test measures the test's
own waits, not how long an import takes on a loaded machine.
"""
import multiprocessing

CONTEXT = multiprocessing.get_context("spawn")


def _after_barrier(barrier, target, args):
    barrier.wait()
    target(*args)


def start_ranks(target, args_of_ranks: list[tuple], timeout: float = 300) -> list:
    """Starts target(*args) for each args of args_of_ranks (module-level, picklable), all at once when every
    child is ready; returns the started processes. Queues they write to come from CONTEXT.Queue()."""
    barrier = CONTEXT.Barrier(len(args_of_ranks) + 1)
    processes = [CONTEXT.Process(target=_after_barrier, args=(barrier, target, args)) for args in args_of_ranks]
    for process in processes:
        process.start()
    barrier.wait(timeout)
    return processes
