"""Where experiments live: a local folder or a cloud URI (`s3://bucket/prefix`, `gs://...`), read
and written through `pyarrow.fs` only. No `ray`.

A *location* is either a local path or a URI. Ray Tune and Train take one as `storage_path` +
`storage_filesystem` (`for_ray`); the steps that need local files (the report's plots, SQLite,
the ensemble's checkpoints) read small files directly (`read_bytes`), copy what they need into a
local cache mirroring the bucket (`<cache>/<bucket>/<prefix>/...`, `cache_path`, `local_copy`)
and upload what they wrote (`upload`). S3 takes its endpoint, region and credentials from the
usual AWS settings (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, ...), on every node:
nothing secret is pickled into the experiment. GCS (`gs://`) takes Google's application default
credentials; with STORAGE_EMULATOR_HOST set (Google's variable for a local emulator, e.g.
`http://127.0.0.1:4443`) every `gs://` location goes to that endpoint without credentials instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from geopose_ray.errors import InputError

Location = str | Path
LOCAL_SCHEMES = ("", "file")
GCS_SCHEMES = ("gs", "gcs")
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"  # what Google's own clients read; pyarrow does not
CHUNK = 16 * 2**20  # bytes per request: an object store pays per request, a checkpoint is ~100s of MB
# a pre-flight probe gives up after this long: Arrow's GCS client otherwise retries a request it
# cannot authenticate for 15 minutes, so a run without credentials hung before its first write
PROBE_RETRY_S = 10


def is_remote(location: Location) -> bool:
    """True for a URI with a scheme other than file:// (a Windows drive letter is no scheme)."""
    scheme = urlsplit(str(location)).scheme
    return "://" in str(location) and scheme not in LOCAL_SCHEMES


def normalize(location: Location) -> str | Path:
    """A checked location: an absolute Path for a local folder (file:// URIs included), the URI
    without a trailing slash for a remote one. InputError (exit 2) for a URI pyarrow cannot open."""
    text = str(location)
    if not is_remote(text):
        return Path(urlsplit(text).path if text.startswith("file://") else text).expanduser().resolve()
    parts = urlsplit(text)
    if not parts.netloc:
        raise InputError(text, "a storage URI needs a bucket: scheme://bucket/prefix")
    try:
        resolve(text)  # unknown scheme, missing bucket or credentials: one line, exit 2
    except InputError as e:
        raise InputError(text, e.problem) from None
    return text.rstrip("/")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str, emulator: str | None) -> pafs.FileSystem:
    """One filesystem per bucket (from_uri asks S3 for the bucket's region: once is enough).
    `emulator`: STORAGE_EMULATOR_HOST for a `gs://` location (`http://host:port` or `host:port`),
    reached anonymously; the filesystem pickles with it, so Ray's workers use it too."""
    uri = f"{scheme}://{netloc}" + (f"?{query}" if query else "")
    try:
        if emulator:
            url = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            return pafs.GcsFileSystem(anonymous=True, scheme=url.scheme, endpoint_override=url.netloc)
        fs, _ = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, TypeError, ImportError) as e:  # ArrowInvalid is a ValueError
        raise InputError(uri, f"cannot open this storage ({str(e).splitlines()[0][:160]})") from None
    return fs


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a location; local paths get the local filesystem."""
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(normalize(location))
    parts = urlsplit(str(location))
    path = (parts.netloc + parts.path).rstrip("/")
    emulator = os.environ.get(GCS_EMULATOR_ENV) if parts.scheme in GCS_SCHEMES else None
    return _filesystem(parts.scheme, parts.netloc, parts.query, emulator or None), path


def for_ray(location: Location) -> tuple[str, pafs.FileSystem | None]:
    """Ray's (storage_path, storage_filesystem): the local path and None (Ray's default), or the
    path inside the bucket and its filesystem."""
    if not is_remote(location):
        return str(location), None
    fs, path = resolve(location)
    return path, fs


def join(location: Location, *parts: str) -> str:
    """A location below `location` (a URI keeps its scheme and query)."""
    if not is_remote(location):
        return str(Path(location).joinpath(*parts))
    split = urlsplit(str(location))
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{split.scheme}://{split.netloc}{path}" + (f"?{split.query}" if split.query else "")


def parent(location: Location) -> str:
    """The folder holding `location`."""
    if not is_remote(location):
        return str(Path(location).parent)
    split = urlsplit(str(location))
    path = split.path.rstrip("/").rsplit("/", 1)[0]
    return f"{split.scheme}://{split.netloc}{path}" + (f"?{split.query}" if split.query else "")


def to_location(base: Location, fs_path: str) -> str:
    """A path inside `base`'s filesystem (what Ray reports, e.g. a checkpoint's path) as a location."""
    if not is_remote(base):
        return fs_path
    split = urlsplit(str(base))
    return f"{split.scheme}://{fs_path.lstrip('/')}" + (f"?{split.query}" if split.query else "")


def probe(location: Location) -> None:
    """Reach a remote location once, before any work: missing credentials or an unreachable
    endpoint give one line (InputError, exit 2) within `PROBE_RETRY_S`. Runs keep the client's
    own retries; only this probe is short."""
    if not is_remote(location):
        return
    parts = urlsplit(str(location))
    fs, path = resolve(location)
    if parts.scheme in GCS_SCHEMES and not os.environ.get(GCS_EMULATOR_ENV):
        query = "&".join(q for q in (parts.query, f"retry_limit_seconds={PROBE_RETRY_S}") if q)
        fs = _filesystem(parts.scheme, parts.netloc, query, None)
    try:
        fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(str(location), f"cannot reach this storage ({str(e).splitlines()[0][:200]})") from None


def _info(location: Location) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: Location) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    return _info(location).type == pafs.FileType.File


def read_bytes(location: Location) -> bytes:
    """A small file's content (members.json, a checkpoint's val_score.npy)."""
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path, compression=None) as f:  # no .gz guessing
            return f.read()
    except FileNotFoundError:
        raise InputError(str(location), "file not found") from None


def subdir_files(location: Location, filename: str) -> list[tuple[str, float]]:
    """(folder name, modification time) of every direct sub-folder of `location` that holds
    `filename`: how the latest experiment with members is found, local or remote."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    if fs.type_name == "gcs":
        # pyarrow lists a GCS folder's sub-folders from their empty `name/` marker objects only
        # (apache/arrow#35993): one written without a marker (a single uploaded file, gsutil) would
        # be missed. One recursive listing sees every object (all of the prefix's, in pages of 1000).
        found = []
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            parts = i.path[len(path) + 1 :].split("/")
            if i.type == pafs.FileType.File and len(parts) == 2 and parts[1] == filename:
                found.append((parts[0], i.mtime.timestamp()))
        return found
    dirs = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.Directory]
    infos = fs.get_file_info([f"{d.path}/{filename}" for d in dirs])
    return [(d.base_name, i.mtime.timestamp()) for d, i in zip(dirs, infos) if i.type == pafs.FileType.File]


def cache_path(location: Location, cache: Path) -> Path:
    """The local mirror of a remote location: `<cache>/<bucket>/<prefix>/...` (a local
    location is its own copy)."""
    if not is_remote(location):
        return Path(location)
    split = urlsplit(str(location))
    return Path(cache) / split.netloc / split.path.strip("/")


def download(location: Location, dest: Path) -> Path:
    """Copy a remote file or folder to `dest` (a folder's files are merged into `dest`)."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise InputError(str(location), "not found in the storage")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if kind == pafs.FileType.Directory:
        dest.mkdir(parents=True, exist_ok=True)
        local = pafs.LocalFileSystem()
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=local, chunk_size=CHUNK)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}", dir=dest.parent)
        os.close(fd)
        local = pafs.LocalFileSystem()
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=local, chunk_size=CHUNK)
        os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def _node_lock(path: Path):
    """An exclusive lock between the processes of one machine (a lock file beside `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".lock-{path.name}"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_copy(location: Location, cache: Path) -> Path:
    """A local folder or file with the content of `location`: itself when local, else its
    mirror in `cache`, downloaded once. Ray actors of one node share it: one downloads while the
    others wait (a lock file), into a temporary folder renamed when complete, so an interrupted
    download never leaves a partial copy under the final name."""
    if not is_remote(location):
        return Path(location)
    dest = cache_path(location, cache)
    if dest.exists():
        return dest
    with _node_lock(dest):
        if dest.exists():  # another process finished it while this one waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
        try:
            os.rename(download(location, tmp / dest.name), dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload(local: Path, location: Location) -> None:
    """Copy a local file or folder to a remote location (nothing to do for a local one that
    is the same place)."""
    if not is_remote(location):
        if Path(local).resolve() != Path(location).resolve():
            raise ValueError(f"upload to a local location: copy {local} to {location} yourself")
        return
    fs, path = resolve(location)
    if Path(local).is_dir():
        here = pafs.LocalFileSystem()
        pafs.copy_files(str(local), path, source_filesystem=here, destination_filesystem=fs, chunk_size=CHUNK)
    else:
        with open(local, "rb") as src, fs.open_output_stream(path, compression=None) as dst:
            shutil.copyfileobj(src, dst, length=8 * 2**20)
