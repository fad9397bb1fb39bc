"""What QEMU's threads are doing, from /proc: which thread a command started, and
whether it sleeps writing to a pipe.

A thread's wchan (/proc/PID/task/TID/wchan) names the kernel function it sleeps in;
the kernel shows it to the process's owner and root (PTRACE_MODE_READ) and prints
``0`` where it cannot name it (no kallsyms) or for a running thread.
"""
import os

PIPE = "pipe"  # pipe_write, anon_pipe_write (Linux >= 6.15), pipe_wait (before 5.5)


def tasks(pid):
    """The thread ids of process ``pid`` (a set of str), empty when it is gone."""
    try:
        return set(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return set()


def wchan(pid, tid):
    """Where thread ``tid`` of ``pid`` sleeps (a kernel function's name), "0" while it
    runs or where the kernel will not say, None when unreadable."""
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return f.read().strip()
    except OSError:
        return None


def state(pid, tid):
    """Thread ``tid``'s state letter (R running, S sleeping, D waiting in the kernel...),
    None when it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return chr(stat[stat.rindex(b")") + 2])


def writing_pipe(pid, tids):
    """True when one of the threads ``tids`` of ``pid`` sleeps writing to a pipe."""
    return any(PIPE in (wchan(pid, tid) or "") for tid in tids)


def sleeping(pid, tids):
    """True when one of the threads ``tids`` of ``pid`` sleeps (where the kernel does
    not name wchan, the only sign of a thread waiting on something)."""
    return any(state(pid, tid) == "S" for tid in tids)
