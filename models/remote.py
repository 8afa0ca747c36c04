"""Bundles named by URI: published to object storage, fetched into a node-local cache, verified before use.

A bundle is named by a local path (as always) or by a URI such as `s3://bucket/prefix/<version>/`. The object
store is reached through `pyarrow.fs` (S3 via the AWS SDK's default chain: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and `AWS_ENDPOINT_URL` for an S3 API server other than AWS's).

Publishing (`publish`) uploads every file the manifest lists, then the manifest: a reader that finds the manifest
finds every file it names, so nobody sees half a bundle. A version, once published, is immutable: publishing
other content under the same version is refused.

Fetching (`localize`) reads the remote manifest, then installs the bundle once per node under
`<cache>/<version>-<digest of the URI and manifest>/`:
- each file is streamed into a private temp folder beside it and its sha256 checked against the manifest as it
  arrives (a tampered object is refused, naming it), the manifest written last;
- the folder is renamed into place in one `rename(2)`, which is atomic on one filesystem: a partial download is
  never at the final path, so it is never used;
- an exclusive `flock` per entry makes replicas of one node that start together download once; the others wait
  and take the installed copy. A fetch that died leaves only a temp folder, which the next fetch removes.
An installed copy is verified again (every hash) before use; one that fails is moved aside and fetched anew.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from models.data import sha256_file
from models.errors import BundleIntegrityError, BundleNotFoundError, BundleStoreError, ConfigError

MANIFEST = "manifest.json"  # models.bundle.MANIFEST_FILE (not imported: this module loads no pandas)
_CHUNK = 1 << 20
# What pyarrow.fs raises when a store is unreachable, a key is refused or a name is malformed.
_FS_ERRORS = (OSError, ValueError)


def is_uri(ref: str | os.PathLike[str]) -> bool:
    """True when `ref` names a bundle by URI (`s3://...`), False for a local path (absolute or relative)."""
    return "://" in str(ref) and not str(ref).startswith("file://")


def _split(uri: str) -> tuple[Any, str]:
    """(pyarrow FileSystem, path in it) for a URI; a trailing slash is ignored."""
    from pyarrow import fs  # the S3 client loads only where a URI is used

    try:
        filesystem, path = fs.FileSystem.from_uri(uri.rstrip("/"))
    except _FS_ERRORS as exc:
        raise ConfigError(f"{uri!r} is not a bundle URI this build can open ({exc}): use s3://bucket/prefix/") from exc
    return filesystem, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended: join("s3://b/p/", "v1") == "s3://b/p/v1"."""
    return "/".join([uri.rstrip("/"), *parts])


def _read(filesystem: Any, path: str, uri: str) -> bytes | None:
    """An object's bytes, or None when there is no such object."""
    from pyarrow import fs

    try:
        if filesystem.get_file_info(path).type != fs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except _FS_ERRORS as exc:
        raise _unreachable(uri, exc) from exc


def _unreachable(uri: str, exc: Exception) -> BundleStoreError:
    return BundleStoreError(
        f"object store error at {uri} ({exc}): check the URI, AWS_ENDPOINT_URL and the credentials "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)"
    )


def remote_manifest(uri: str) -> tuple[bytes, dict[str, Any]]:
    """The bundle's manifest at `uri`: its bytes and the parsed object.

    Raises BundleNotFoundError when there is none (not published, or a publish still under way),
    BundleIntegrityError when it is not a manifest, BundleStoreError when the store cannot be read."""
    filesystem, base = _split(uri)
    raw = _read(filesystem, f"{base}/{MANIFEST}", join(uri, MANIFEST))
    if raw is None:
        raise BundleNotFoundError(
            f"no bundle at {uri}: {join(uri, MANIFEST)} does not exist; publish one with `recserve bundle push "
            "DIR URI` or `recserve train --out URI` (the manifest is written last, so a publish under way shows "
            "nothing yet)"
        )
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        version = manifest["version"]
        if not isinstance(files, dict) or not files or not isinstance(version, str):
            raise TypeError("files must be a non-empty object and version a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleIntegrityError(
            f"{join(uri, MANIFEST)} is not a bundle manifest ({exc}): publish it again"
        ) from None
    for name in files:
        if name != Path(name).name or name in ("", ".", "..", MANIFEST):
            raise BundleIntegrityError(f"{join(uri, MANIFEST)} lists {name!r}, which is not a plain file name")
    return raw, manifest


def localize(ref: str | os.PathLike[str], cache: Path) -> Path:
    """A local directory holding the bundle `ref` names: a local path as it is, a URI fetched into `cache`.

    The local copy is complete and every file's sha256 matches the manifest (see the module's docstring).
    Raises BundleNotFoundError, BundleIntegrityError (naming the object or file) or BundleStoreError."""
    if not is_uri(ref):
        return Path(str(ref).removeprefix("file://"))
    uri = str(ref)
    raw, manifest = remote_manifest(uri)
    digest = hashlib.sha256(uri.rstrip("/").encode() + b"\0" + raw).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{manifest['version']}-{digest}"
    with _locked(cache / f".{final.name}.lock"):
        if final.is_dir():
            try:
                _check_local(final, manifest["files"])
                return final
            except BundleIntegrityError:
                # Altered or damaged on this node: set it aside (a running replica may still read it) and refetch.
                final.rename(cache / f".stale-{final.name}-{os.getpid()}")
        for leftover in cache.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a fetch that died; we hold the lock, so none is live
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache))
        try:
            _download(uri, manifest["files"], tmp)
            (tmp / MANIFEST).write_bytes(raw)
            os.rename(tmp, final)  # atomic: readers see no bundle or a whole one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for stale in cache.glob(f".stale-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(uri: str, files: dict[str, str], into: Path) -> None:
    filesystem, base = _split(uri)
    for name, expected in sorted(files.items()):
        source = join(uri, name)
        digest = hashlib.sha256()
        try:
            with filesystem.open_input_stream(f"{base}/{name}") as stream, (into / name).open("wb") as out:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except FileNotFoundError as exc:
            raise BundleIntegrityError(
                f"bundle object {source} is missing, though the manifest lists it: publish the bundle again"
            ) from exc
        except _FS_ERRORS as exc:
            raise _unreachable(source, exc) from exc
        if digest.hexdigest() != expected:
            raise BundleIntegrityError(
                f"bundle object {source} was altered: sha256 {digest.hexdigest()[:12]}… but the manifest says "
                f"{expected[:12]}…; refused. Publish the bundle again from a verified copy"
            )


def _check_local(directory: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        path = directory / name
        actual = sha256_file(path) if path.is_file() else None
        if actual != expected:
            raise BundleIntegrityError(f"cached bundle file {path} does not match the manifest")


def publish(directory: Path, uri: str) -> str:
    """Upload the bundle in `directory` to `uri` and return the bundle's URI.

    `uri` is the bundle's own URI when its last part is the bundle's version (s3://b/bundles/v1/), else a prefix
    under which the bundle goes as <version>/. Every listed file goes first, the manifest last (see the module's
    docstring). Publishing the same bundle again changes nothing; other content under a published version is
    refused. The caller verifies the directory first (models.bundle.verified). Raises ConfigError,
    BundleStoreError."""
    raw = (directory / MANIFEST).read_bytes()
    manifest = json.loads(raw)
    version = manifest["version"]
    target = uri.rstrip("/") if uri.rstrip("/").rsplit("/", 1)[-1] == version else join(uri, version)
    try:
        existing, _ = remote_manifest(target)
    except BundleNotFoundError:
        existing = None
    if existing is not None:
        if existing == raw:
            return target + "/"
        raise ConfigError(
            f"{target} already holds a published bundle {version!r} with another manifest: versions are "
            "immutable; train or copy it under a new --version"
        )
    filesystem, base = _split(target)
    try:
        for name in [*sorted(manifest["files"]), MANIFEST]:  # the manifest last: it makes the bundle visible
            with (directory / name).open("rb") as source, filesystem.open_output_stream(f"{base}/{name}") as out:
                while chunk := source.read(_CHUNK):
                    out.write(chunk)
    except _FS_ERRORS as exc:
        raise _unreachable(target, exc) from exc
    return target + "/"
