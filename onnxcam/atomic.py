"""Write output files whole or not at all.

Data goes to a temporary file next to the target, which is renamed onto the target
(``os.replace``, atomic on POSIX and Windows within one file system) only once it is complete.
An interrupted or failed write leaves the previous file, if any, untouched and no partial file.
The temporary file is created with the usual permissions (0666 minus the umask), so the result
looks like a normally written file. A symlink at the target is replaced, not followed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from onnxcam.errors import OptionError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed onto ``path``.

    The temporary name keeps ``path``'s suffix (".png", ".npy"...), so writers that pick a format
    from the name (``Image.save``, ``np.save``) behave as for ``path``. It exists, empty, when the
    block starts. If the block raises (KeyboardInterrupt included) the temporary file is removed
    and the exception propagates; ``path`` is left as it was. A folder that does not exist or
    cannot be written raises OptionError naming ``path``.
    """
    target = Path(path)
    if target.is_dir():
        raise OptionError(f"{target}: is a folder; give a file name to write to")
    temporary = _create_temporary(target)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _create_temporary(target: Path) -> Path:
    folder = target.parent
    for _ in range(100):
        candidate = folder / f".{target.stem}.{secrets.token_hex(4)}.tmp{target.suffix}"
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OptionError(
                f"{target}: cannot write there ({reason}); check that the folder exists and is writable"
            ) from None
        os.close(descriptor)
        return candidate
    raise OptionError(f"{target}: could not create a temporary file next to it; clean up .*.tmp* files in {folder}")


def _flush_to_disk(file: Path) -> None:
    """fsync the finished temporary file so the rename never exposes unwritten data after a crash."""
    with contextlib.suppress(OSError):
        descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
