"""Where runs are kept: a local or shared folder, or any URI ``pyarrow.fs`` opens.

``run.storage_path`` names it (as Ray Train's ``storage_path`` does); each run lives in
``<storage_path>/<run.name>``. A local folder is written in place, exactly as ``runs/<name>``
always was. A remote one (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, credentials from
the environment as pyarrow reads them; S3-compatible servers via
``?endpoint_override=host:port&scheme=http``) is written from local working copies: the learner
stages each checkpoint on its own node and uploads it; the driver uploads the CSVs, plots, logs
and config at each checkpoint and at the end.

Atomic without rename (object stores have none): a checkpoint is complete once its
``manifest.json`` (every file with its size) and then ``latest`` (its name, one small object) are
written, both after every file is uploaded. Readers follow ``latest`` only, and check the manifest;
a job killed half-way leaves a partial ``step_*`` that nothing points to, and the next save of that
step replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, storage unreachable); the previous one is intact."""


def atomic_write(path: str, text: str) -> None:
    """Write a local file whole: a temporary file, fsynced, renamed over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_remote(path: str) -> bool:
    """A URI for pyarrow.fs (``s3://``, ``gs://``, ``hdfs://``, ...); ``file://`` and plain paths are local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths; for a URI, joined before its ``?query`` (which it keeps)."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    head, q, query = base.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + (q + query if q else "")


def display(path: str) -> str:
    """A location to print: a URI without its query (which may carry an endpoint or keys)."""
    return path.partition("?")[0] if is_remote(path) else local_path(path)


class Storage:
    """One place (a local folder or a URI) and the few operations runs need, relative to it."""

    def __init__(self, root: str):
        self.root = root
        self.remote = is_remote(root)
        import pyarrow.fs as pafs

        if self.remote:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), local_path(root)

    def path(self, rel: str = "") -> str:
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def files(self, rel: str = "") -> Dict[str, int]:
        """Every file below ``rel``: relative name -> size (empty when there is nothing)."""
        import pyarrow.fs as pafs

        top = self.path(rel).rstrip("/")
        if self.fs.get_file_info(top).type != pafs.FileType.Directory:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        return {i.path[len(top) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """One object written whole (S3: a single PUT; local: a temporary file renamed)."""
        target = self.path(rel)
        if not self.remote:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, text)
            return
        with self.fs.open_output_stream(target) as f:
            f.write(text.encode())

    def upload(self, local_dir: str, rel: str, names: Optional[List[str]] = None, skip: Tuple[str, ...] = ()) -> Dict[str, int]:
        """Copy ``local_dir`` (or only ``names`` in it, files or folders, less the relative paths in
        ``skip``) to ``rel``; returns name -> size."""
        import pyarrow.fs as pafs

        local = pafs.LocalFileSystem()
        sent: Dict[str, int] = {}
        for dirpath, _, filenames in os.walk(local_dir):
            for fn in filenames:
                src = os.path.join(dirpath, fn)
                name = os.path.relpath(src, local_dir)
                if (names is not None and name.split(os.sep)[0] not in names) or name.replace(os.sep, "/") in skip:
                    continue
                if not os.path.isfile(src):  # a socket (the private Redis's) or a FIFO: not data, and unreadable as a file
                    continue
                dst = self.path(f"{rel}/{name}" if rel else name)
                if not self.remote:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                pafs.copy_files(src, dst, source_filesystem=local, destination_filesystem=self.fs)
                sent[name.replace(os.sep, "/")] = os.path.getsize(src)
        return sent

    def download(self, rel: str, local_dir: str, names: Optional[List[str]] = None) -> List[str]:
        """Copy the files below ``rel`` (or only ``names``: top-level files or folders) into ``local_dir``."""
        import pyarrow.fs as pafs

        got = []
        for name in self.files(rel):
            if names is not None and name.split("/")[0] not in names:
                continue
            dst = os.path.join(local_dir, *name.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            pafs.copy_files(self.path(f"{rel}/{name}" if rel else name), dst, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            got.append(name)
        return got

    def delete(self, rel: str) -> None:
        target = self.path(rel)
        if not self.exists(rel):
            return
        if not self.remote:
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        else:
            self.fs.delete_dir(target)


def fetch(uri: str) -> str:
    """A local copy of a remote file or folder (a new temporary folder; the caller may remove it);
    a local path is returned as it is."""
    if not is_remote(uri):
        return uri
    import pyarrow.fs as pafs

    st = Storage(uri)
    kind = st.fs.get_file_info(st.base).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{display(uri)}: not found")
    local = tempfile.mkdtemp(prefix="agro_dist-fetch-")
    if kind == pafs.FileType.File:
        dst = os.path.join(local, st.base.rstrip("/").rsplit("/", 1)[-1])
        pafs.copy_files(st.base, dst, source_filesystem=st.fs, destination_filesystem=pafs.LocalFileSystem())
        return dst
    st.download("", local)
    return local


# ---------------------------------------------------------------------- checkpoints on remote storage


def latest_checkpoint(root: str) -> Optional[str]:
    """The name of ``root``'s newest complete checkpoint (what ``latest`` holds), or None."""
    st = Storage(root)
    return st.read_text("latest").strip() if st.exists("latest") else None


def commit_checkpoint(root: str, name: str, uploaded: Dict[str, int]) -> None:
    """Make ``root/name`` the latest checkpoint once every file is uploaded: its manifest first,
    then ``latest``. Each is one object, so a reader sees the old checkpoint or the whole new one."""
    st = Storage(root)
    st.write_text(f"{name}/manifest.json", json.dumps({"files": uploaded}, indent=1, sort_keys=True))
    st.write_text("latest", name)


def fetch_checkpoint(root: str, name: Optional[str] = None) -> Tuple[str, str]:
    """Download ``root``'s checkpoint ``name`` (default: the latest) into a new local folder after
    checking it against its manifest; returns (local folder, name). The caller removes the folder."""
    st = Storage(root)
    name = name or latest_checkpoint(root)
    if name is None:
        raise FileNotFoundError(f"no checkpoint in {display(root)} (no 'latest')")
    if not st.exists(f"{name}/manifest.json"):
        raise FileNotFoundError(f"checkpoint {display(join(root, name))} is incomplete (no manifest.json)")
    want = json.loads(st.read_text(f"{name}/manifest.json"))["files"]
    have = st.files(name)
    bad = [f"{k} ({'missing' if k not in have else f'{have[k]} bytes, manifest says {v}'})" for k, v in want.items() if have.get(k) != v]
    if bad:
        raise FileNotFoundError(f"checkpoint {display(join(root, name))} does not match its manifest: {', '.join(bad[:5])}")
    local = tempfile.mkdtemp(prefix=f"agro_dist-{name}-")
    try:
        st.download(name, local, names=sorted({k.split('/')[0] for k in want}))
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return local, name
