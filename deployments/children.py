"""Programs a deployment runs beside itself (HAProxy, the speech synthesiser): they go when their parent goes."""

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (kept across exec).

    Call it in the child (``preexec_fn``, or before ``exec``), as early as possible. The parent is the
    *thread* that started the child: start children from a thread that lives as long as they should (a
    replica's event loop). A parent that died before the request took effect shows as a changed parent
    pid, whether the orphan went to init or to a subreaper: this process then exits instead of running on
    unwatched.
    """
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent or parent == 1:
        raise SystemExit("the process that started this one is gone")
