"""Where this process stands in the process group, for code that also runs without one."""
from __future__ import annotations

import pickle
import socket
import threading

import torch
import torch.distributed as dist

#: seconds between rank 0's heartbeats while it computes alone (on_rank0)
HEARTBEAT_S = 1.0


def free_port() -> int:
    """A free TCP port on the loopback address, for a process group's master port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(compute):
    """compute() on rank 0 only, its result (or the exception it raised) broadcast to every rank, so that
    all ranks go on with the same answer or the same error; called directly without a process group.

    However long compute() takes (a first scan of ImageNet: minutes), no rank waits in a collective
    longer than HEARTBEAT_S: rank 0 broadcasts a heartbeat every HEARTBEAT_S seconds from a thread on a
    gloo group of this call, and the other ranks wait for it heartbeat by heartbeat, so the process
    group's timeout never fires and a signal reaches every rank's Python code within a heartbeat. If
    rank 0 dies, the others' next heartbeat fails at once.
    """
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    group = dist.new_group(backend="gloo")
    try:
        box: list = [None]
        if rank == 0:
            box[0] = _compute_with_heartbeat(compute, group)
        else:
            _wait_for_rank0(group)
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _compute_with_heartbeat(compute, group):
    done = threading.Event()

    def beat() -> None:
        flag = torch.zeros(1, dtype=torch.int32)
        while not done.wait(HEARTBEAT_S):
            dist.broadcast(flag, src=0, group=group)
        dist.broadcast(flag.fill_(1), src=0, group=group)

    heart = threading.Thread(target=beat, name="moca_fast-on_rank0-heartbeat", daemon=True)
    heart.start()
    try:
        result = compute()
    except BaseException as e:  # every rank leaves the wait and raises the same error (a stop request too)
        result = _shareable(e)
    finally:
        done.set()
        heart.join()
    return result


def _wait_for_rank0(group) -> None:
    flag = torch.zeros(1, dtype=torch.int32)
    while True:
        dist.broadcast(flag, src=0, group=group)
        if flag.item():
            return


def _shareable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError with its text when it cannot be pickled (so the broadcast cannot fail)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")
