"""One download cache for model files: atomic, hash-checked, and clear about what to do offline.

``cached_file(url, sha256=...)`` returns the path of the file in the cache, downloading it first
if needed.  The cache is ``$GANDISSECT_CACHE`` or ``~/.cache/gandissect-widgets``.  A download
goes to a temporary file beside its destination and is moved into place (``os.replace``) only
when it is whole and its SHA-256 (or the known prefix of it) matches, so the cache never holds a
partial or wrong file.

Every cached file has its full SHA-256 recorded beside it, in ``<file>.sha256`` (``sha256sum``
format), written atomically before the file is moved into place.  A file is checked against that
record (and against the caller's ``sha256``, if given) every time it is used; a file without a
record that no expected hash vouches for (put there by hand, or by an older version) is refused,
as is one that does not match, with a ``DownloadError`` naming the file, the expected and actual
hashes and how to get a good copy.  Files given as local paths (``checkpoint=...``) never pass
through here.  When the file cannot be fetched, ``DownloadError`` names the file, the URL, and the
path to put it at by hand.
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

__all__ = ["CACHE_ENV", "cache_dir", "cached_file", "DownloadError", "hash_prefix_from_name", "sha256_file",
           "recorded_sha256", "verify_cached", "HASH_SUFFIX"]

CACHE_ENV = "GANDISSECT_CACHE"
HASH_SUFFIX = ".sha256"  # the record of a cached file's SHA-256, beside it
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


def recorded_sha256(path) -> str | None:
    """The SHA-256 recorded for a cached file in ``<path>.sha256`` (None when there is no record)."""
    record = os.fspath(path) + HASH_SUFFIX
    try:
        with open(record, "rb") as f:
            text = f.read(4096).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    token = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", token):
        raise DownloadError(f"{record} does not hold a SHA-256 (64 hex digits) but {text[:80].strip()!r}: the "
                            f"record of {path} is damaged. Delete both files to download it again.")
    return token


def _write_record(path, digest):
    from gandissect_widgets.engine.io import atomic_write_bytes
    atomic_write_bytes(os.fspath(path) + HASH_SUFFIX, f"{digest}  {os.path.basename(path)}\n".encode())


def verify_cached(path, url: str = "", sha256: str | None = None) -> str:
    """Check a cached file against its recorded SHA-256 (and ``sha256``, a prefix, if given) before use.

    A file without a record is accepted only when ``sha256`` vouches for it (the record is then
    written); otherwise, and on any mismatch, ``DownloadError`` says what to do.  Returns ``path``."""
    path = os.fspath(path)
    source = f" from {url}" if url else ""
    recorded = recorded_sha256(path)
    if recorded is None and sha256 is None:
        raise DownloadError(
            f"{path} is in the cache without a recorded SHA-256 ({path}{HASH_SUFFIX} is missing), so it cannot be "
            f"checked before use: it may be incomplete or a different file. Delete it to download it again"
            f"{source}; or, if you put it there yourself and trust it, record its hash with "
            f"`sha256sum {path} > {path}{HASH_SUFFIX}`, or pass its folder as checkpoint= to use it as your own file.")
    actual = sha256_file(path)
    if recorded is not None and actual != recorded:
        raise DownloadError(
            f"{path} in the cache does not match its recorded SHA-256 (expected {recorded}, actual {actual}): it "
            f"is damaged or was replaced. Delete it and {path}{HASH_SUFFIX} to download it again{source}.")
    if not _check_hash(actual, sha256):
        raise DownloadError(
            f"{path} is in the cache but its SHA-256 does not start with {sha256} (actual {actual}): it is not the "
            f"expected file. Delete it to download it again{source}.")
    if recorded is None:
        try:
            _write_record(path, actual)  # vouched for by ``sha256``: record the whole hash
        except OSError:
            pass  # checked against ``sha256`` again next time
    return path


def cached_file(url: str, filename: str | None = None, sha256: str | None = None, subdir: str = "",
                progress: bool = True, timeout: float = 30.0) -> str:
    """Path of ``url``'s file in the cache, downloaded first if it is not there, checked before it is returned.

    sha256: the file's SHA-256, or a prefix of it (at least 8 hex digits); None = the file is checked
    against the SHA-256 recorded when it was downloaded (``<file>.sha256``).  subdir: folder inside the cache.
    """
    filename = filename or os.path.basename(urllib.request.urlparse(url).path)
    if not filename:
        raise ValueError(f"cannot tell a file name from the URL {url!r}; pass filename=")
    if filename in (".", "..") or os.path.basename(filename) != filename or "\\" in filename:
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
        raise ValueError(f"sha256 must be 8 to 64 hex digits, got {sha256!r}")
    dest_dir = os.path.join(cache_dir(), subdir) if subdir else cache_dir()
    dest = os.path.join(dest_dir, filename)
    if os.path.exists(dest):
        return verify_cached(dest, url, sha256)
    tmp = None
    try:
        os.makedirs(dest_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{filename}.", suffix=".part")
        digest = _fetch(url, fd, filename, progress, timeout)
    except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise DownloadError(
            f"could not download {filename} from {url} ({type(e).__name__}: {e}). Without network access, fetch "
            f"the file elsewhere and put it at {dest} with its SHA-256 in {dest}{HASH_SUFFIX} (`sha256sum` output; "
            f"the cache is {dest_dir}; set {CACHE_ENV} to move it), or pass checkpoint=PATH to load a local copy.") \
            from e
    try:
        if not _check_hash(digest, sha256):
            raise DownloadError(f"{filename} downloaded from {url} has SHA-256 {digest}, which does not start with "
                                f"the expected {sha256}; the file was not kept.")
        try:
            _write_record(dest, digest)  # the record first: a file in the cache always has one
            os.replace(tmp, dest)
        except OSError as e:
            if not os.path.exists(dest) and os.path.exists(dest + HASH_SUFFIX):
                os.unlink(dest + HASH_SUFFIX)
            reason = getattr(e, "reason", None) or e.strerror or str(e)
            raise DownloadError(f"downloaded {filename} from {url} but could not store it in the cache {dest_dir} "
                                f"({reason}); nothing was kept. Free some space there or set {CACHE_ENV} to "
                                f"another folder.") from e
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
