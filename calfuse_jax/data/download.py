"""Public files fetched into the data folder: `Resource`, `fetch` and `ensure_extracted`.

Downloads resume with HTTP Range, are verified against the published checksum before use, and
unpack into a temporary folder renamed into place once complete (unsafe members refused first).
Every failure raises `DownloadError` saying where a copy fetched by hand goes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path

import requests
from tqdm.auto import tqdm

from calfuse_jax.files import waiting_lock

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read while hashing
STREAM_CHUNK = 1 << 16  # bytes per network read (a broken connection loses the one in progress)
TIMEOUT = (15, 60)  # seconds: connect, and between two reads
MAX_ATTEMPTS = 5  # a broken connection is resumed while each attempt brings new bytes
# tarfile's "data" filter where this Python has it; our own member checks (`_unsafe`) run first.
_DATA_FILTER = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class DownloadError(FileNotFoundError):
    """A file could not be fetched, verified or unpacked; the message says what to do by hand."""


@dataclasses.dataclass(frozen=True)
class Resource:
    """One public file: its name (in the data folder and under a mirror), URL and checksum."""

    file: str
    url: str
    checksum: str  # hex digest as published
    algorithm: str  # its hashlib name: "md5" or "sha256"
    unpacks_to: str | None = None  # the folder the archive holds; None: a file used as it is


@dataclasses.dataclass(frozen=True)
class _Job:
    resource: Resource
    folder: Path
    mirror: str | None
    download: bool
    progress: bool

    @property
    def path(self) -> Path:
        return self.folder / self.resource.file

    @property
    def url(self) -> str:
        return (
            f"{self.mirror.rstrip('/')}/{self.resource.file}" if self.mirror else self.resource.url
        )

    def lock(self):
        lock = self.folder / f".{self.resource.file}.lock"
        return waiting_lock(lock, f"another process fetching {self.path}")

    def error(self, problem: str) -> DownloadError:
        r = self.resource
        then = "unpacks and uses it" if r.unpacks_to else "uses it"
        return DownloadError(
            f"{problem}. To fetch it by hand, download {r.url} and save it as {self.path} "
            f"({r.algorithm} {r.checksum}): the next run verifies it and {then}. Behind a proxy, "
            f"set $CALFUSE_MIRROR (or the config's dataset.mirror) to a base URL serving {r.file}."
        )


def fetch(
    resource: Resource, folder, *, mirror=None, download: bool = True, progress: bool = True
) -> Path:
    """`folder/<resource.file>`, verified; downloaded first when absent and `download` is set.
    `mirror` (default $CALFUSE_MIRROR) replaces `resource.url` by `<mirror>/<resource.file>`."""
    job = _job(resource, folder, mirror, download, progress)
    with job.lock():
        return _fetch_locked(job)


def ensure_extracted(
    resource: Resource, folder, *, mirror=None, download: bool = True, progress: bool = True
) -> Path:
    """`folder/<resource.unpacks_to>`: fetched (see `fetch`), verified and unpacked when absent;
    the folder only ever appears complete, the archive stays beside it."""
    job = _job(resource, folder, mirror, download, progress)
    target = job.folder / resource.unpacks_to
    if target.is_dir():
        return target
    with job.lock():
        if not target.is_dir():  # else another process unpacked it while we waited
            _unpack(_fetch_locked(job), target, job)
    return target


def file_checksum(path, algorithm: str) -> str:
    """Hex digest of a file with hashlib's `algorithm`, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _job(resource, folder, mirror, download, progress) -> _Job:
    folder = Path(folder).expanduser()
    mirror = mirror or os.environ.get("CALFUSE_MIRROR") or None
    job = _Job(resource, folder, mirror, download, progress)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise job.error(
            f"cannot create the data folder {folder} ({err.strerror or err}); point $CALFUSE_DATA "
            "at a writable folder"
        ) from err
    return job


def _fetch_locked(job: _Job) -> Path:
    r = job.resource
    if job.path.is_file():
        found = file_checksum(job.path, r.algorithm)
        if found != r.checksum:
            raise job.error(
                f"{job.path} has {r.algorithm} {found}, not the published {r.checksum}; delete it "
                "(the next run downloads it again) or replace it by a good copy"
            )
        return job.path
    if not job.download:
        raise job.error(f"{job.path} is missing and downloading is off (dataset.download=false)")
    part = job.path.with_name(job.path.name + ".part")
    _download(job, part)
    found = file_checksum(part, r.algorithm)
    if found != r.checksum:
        part.unlink()  # never resumed from, never trusted
        raise job.error(
            f"the file downloaded from {job.url} has {r.algorithm} {found}, not the published "
            f"{r.checksum} (a changed file, a broken mirror or a proxy's page); it was deleted"
        )
    os.replace(part, job.path)
    log.info("downloaded and verified %s", job.path)
    return job.path


def _download(job: _Job, part: Path) -> None:
    for attempt in range(MAX_ATTEMPTS):
        start = part.stat().st_size if part.exists() else 0
        try:
            _stream(job.url, part, start, job.progress)
            return
        except requests.RequestException as err:  # (an OSError too: caught first)
            got = part.stat().st_size if part.exists() else 0
            if got <= start or attempt == MAX_ATTEMPTS - 1:
                raise job.error(f"could not download {job.url} ({_reason(err)})") from err
            log.warning("the download of %s broke after %d bytes; resuming", job.url, got)
        except OSError as err:  # a full disk, a folder we may not write
            raise job.error(f"could not write {part} ({err.strerror or err})") from err


def _stream(url: str, part: Path, start: int, progress: bool) -> None:
    headers = {"Range": f"bytes={start}-"} if start else {}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as response:
        if start and response.status_code == 416:  # nothing after `start`: the checksum decides
            return
        response.raise_for_status()
        if response.status_code != 206:  # a full answer (200): start again from byte 0
            start = 0
        size = response.headers.get("Content-Length")
        total = start + int(size) if size and size.isdigit() else None
        bar = tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name.removesuffix(".part"), disable=not progress,
        )  # fmt: skip
        with bar, open(part, "ab" if start else "wb") as f:
            for block in response.iter_content(STREAM_CHUNK):
                f.write(block)
                bar.update(len(block))


def _reason(err: requests.RequestException) -> str:
    if isinstance(err, requests.HTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.response.reason}"
    if isinstance(err, requests.Timeout):
        return "the server did not answer in time"
    if isinstance(err, requests.ConnectionError):
        return "no connection: offline, or the host is unreachable"
    return f"the connection broke: {type(err).__name__}"


def _unpack(archive: Path, target: Path, job: _Job) -> None:
    """Unpacks `archive` into a temporary folder, then renames its `target.name` to `target`."""
    # Stale temporary folders, left by a killed run (we hold the lock: no one else writes there).
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        log.info("unpacking %s", archive)
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, members=_checked_members(tar, archive, job), **_DATA_FILTER)
        if not (tmp / target.name).is_dir():
            raise job.error(f"{archive} holds no folder {target.name}/")
        os.replace(tmp / target.name, target)
    except DownloadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        raise job.error(f"could not unpack {archive} ({err})") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked_members(tar: tarfile.TarFile, archive: Path, job: _Job):
    for member in tar:
        if problem := _unsafe(member):
            raise job.error(f"{archive} holds {problem} ({member.name!r}); refusing to unpack it")
        yield member


def _unsafe(member: tarfile.TarInfo) -> str | None:
    """Why `member` could write outside the folder it is unpacked into, or None."""
    name = member.name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "a member with an absolute path"
    if ".." in name.split("/"):
        return "a member whose path climbs out with '..'"
    if member.issym() or member.islnk():
        base = posixpath.dirname(name) if member.issym() else ""  # hard links: from the top
        target = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            return f"a link to {member.linkname!r}, outside the folder"
    elif not (member.isfile() or member.isdir()):
        return "a device or pipe member"
    return None
