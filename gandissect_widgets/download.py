"""One download cache for model files: atomic, hash-checked, and clear about what to do offline.

``cached_file(url, sha256=...)`` returns the path of the file in the cache, downloading it first
if needed.  The cache is ``$GANDISSECT_CACHE`` or ``~/.cache/gandissect-widgets``.  A download
goes to a temporary file beside its destination and is moved into place (``os.replace``) only
when it is whole and its SHA-256 (or the known prefix of it) matches, so the cache never holds a
partial or wrong file.  When the file cannot be fetched, ``DownloadError`` names the file, the URL,
and the path to put it at by hand.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request

from tqdm.auto import tqdm

__all__ = ["CACHE_ENV", "cache_dir", "cached_file", "DownloadError", "hash_prefix_from_name", "sha256_file"]

CACHE_ENV = "GANDISSECT_CACHE"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A model file that could not be fetched or did not match its hash (the message says what to do)."""


def cache_dir() -> str:
    """The cache directory: ``$GANDISSECT_CACHE``, else ``~/.cache/gandissect-widgets``."""
    d = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "gandissect-widgets")
    return os.path.abspath(os.path.expanduser(d))


def hash_prefix_from_name(filename: str) -> str | None:
    """The SHA-256 prefix carried in a name like ``proggan_bedroom-d8a89ff1.pth`` (torch.hub style)."""
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9.]+$", os.path.basename(filename))
    return m.group(1) if m else None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(actual: str, expected: str | None) -> bool:
    return expected is None or actual.startswith(expected.lower())


def cached_file(url: str, filename: str | None = None, sha256: str | None = None, subdir: str = "",
                progress: bool = True, timeout: float = 30.0) -> str:
    """Path of ``url``'s file in the cache, downloaded first if it is not there.

    sha256: the file's SHA-256, or a prefix of it (at least 8 hex digits); None = not checked.
    subdir: folder inside the cache.  A file already in the cache is checked against ``sha256`` too.
    """
    filename = filename or os.path.basename(urllib.request.urlparse(url).path)
    if not filename:
        raise ValueError(f"cannot tell a file name from the URL {url!r}; pass filename=")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
        raise ValueError(f"sha256 must be 8 to 64 hex digits, got {sha256!r}")
    dest_dir = os.path.join(cache_dir(), subdir) if subdir else cache_dir()
    dest = os.path.join(dest_dir, filename)
    if os.path.exists(dest):
        if sha256 is not None and not _check_hash(sha256_file(dest), sha256):
            raise DownloadError(f"{dest} is in the cache but its SHA-256 does not start with {sha256}: it is not "
                                f"the expected file. Delete it to download it again from {url}.")
        return dest
    os.makedirs(dest_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
    try:
        digest = _fetch(url, fd, filename, progress, timeout)
        if not _check_hash(digest, sha256):
            raise DownloadError(f"{filename} downloaded from {url} has SHA-256 {digest}, which does not start with "
                                f"the expected {sha256}; the file was not kept.")
        os.replace(tmp, dest)
    except DownloadError:
        raise
    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(
            f"could not download {filename} from {url} ({type(e).__name__}: {e}). Without network access, fetch "
            f"the file elsewhere and put it at {dest} (the cache is {dest_dir}; set {CACHE_ENV} to move it), "
            f"or pass checkpoint=PATH to load a local copy.") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _fetch(url, fd, filename, progress, timeout) -> str:
    """Stream ``url`` into the open descriptor ``fd``; the hex SHA-256 of what arrived."""
    h = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "gandissect-widgets"})
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        got = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                  disable=not progress) as bar:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise OSError(f"connection closed after {got} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()
