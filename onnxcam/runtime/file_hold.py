"""Holding a file against deletion by another onnxcam process.

A rewritten model in memory may make a new ONNX Runtime session from the cache's weights file at
any time, hours after it was read, while another process prunes the cache. A holder keeps the file
open under a shared ``flock``; pruning deletes a file only while it holds the exclusive lock, which
it cannot get while anyone holds the shared one. The locks go with the process (or the handle), so
a crashed explainer never pins a file. On Windows there is no ``flock``, but an open file cannot
be deleted there, so the open handle alone does the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def hold(path: Path) -> BinaryIO | None:
    """An open handle that keeps ``path`` from being deleted by :func:`remove_unless_held` until it
    is closed; None when the file is not there (or was deleted while it was being opened)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - kept open on purpose
    except OSError:
        return None
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except OSError:  # a file system without locks: the age rule alone protects the file
            same = True
        if not same:  # deleted (and maybe written anew) between the open and the lock
            handle.close()
            return None
    return handle


def remove_unless_held(path: Path) -> bool:
    """Delete ``path`` unless a :func:`hold` of any process has it open; whether it is gone."""
    if fcntl is None:
        return _unlink(path)  # on Windows this fails while any handle is open
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held
        except OSError:
            pass  # a file system without locks: the caller's age rule decides alone
        return _unlink(path)  # under the exclusive lock: no hold can start on this file meanwhile


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
