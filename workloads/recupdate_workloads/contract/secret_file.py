"""Secrets handed to local Ray processes through a private file instead of an environment value.

Ray writes a deployment's ``runtime_env`` (its ``env_vars`` included) into its logs, so local mode never puts
the DSN there: it writes the DSN to a 0600 file in a 0700 directory and passes ``<NAME>_FILE`` (the file's
path) instead; ``secret_from_env`` reads ``$<NAME>``, else the file named by ``$<NAME>_FILE`` (the usual
``_FILE`` convention of container secrets). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

FILE_SUFFIX = "_FILE"


def file_env(name: str) -> str:
    """The variable that names the file holding ``$name``."""
    return name + FILE_SUFFIX


def write_private(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` readable by this user only (0600, directory 0700), atomically."""
    path = Path(path).absolute()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove(path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def secret_from_env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``$name``, else the content of the file named by ``$name_FILE`` (stripped), else None."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    path = env.get(file_env(name))
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise RuntimeError(f"${file_env(name)} names {path}, which cannot be read: {exc.strerror}") from None
