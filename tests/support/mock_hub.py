"""A local stand-in for the Hugging Face Hub's HTTP API: one dataset repo, read only, on 127.0.0.1.

Enough of the Hub for ``hf download``, ``huggingface_hub.hf_hub_download`` / ``snapshot_download``,
``HfFileSystem`` and ``datasets.load_dataset(repo_id, ...)`` (streaming included) once the client
process has ``HF_ENDPOINT`` set to :attr:`MockHub.endpoint` (huggingface_hub reads it at import: set it
in the environment of a subprocess, with ``HF_HUB_OFFLINE`` unset there). The shapes follow what
huggingface_hub 2.x reads (file_download.py, hf_api.py, hf_file_system.py):

- ``HEAD|GET /datasets/{repo}/resolve/{revision}/{path}``: a regular (text) file answers 200 with
  ``ETag`` (its git blob sha1), ``Content-Length`` and ``X-Repo-Commit``; an LFS file (binary, or
  10 MiB and more, as the Hub decides at upload) answers 302 with ``X-Linked-Etag`` (its sha256),
  ``X-Linked-Size``, ``X-Repo-Commit`` and a ``Location`` on another host (``localhost`` instead of
  ``127.0.0.1``, so the client treats it as the CDN: it stops following there on HEAD and drops auth);
- ``HEAD|GET /cdn/{sha256}``: the LFS object's bytes, with ``Range`` (206 / 416) as a CDN serves them;
- ``GET /api/datasets/{repo}`` and ``/api/datasets/{repo}/revision/{revision}``: the repo info
  (``id``, ``sha``, ``siblings``, ``private``, ``gated``, ``cardData`` ...);
- ``GET /api/datasets/{repo}/tree/{revision}[/{path}]?recursive=&expand=``: entries
  ``{"type": "file"|"directory", "path", "oid", "size", "lfs": {"oid", "size", "pointerSize"}}``
  (``lastCommit`` with ``expand``), one page (no ``Link`` header);
- ``POST /api/datasets/{repo}/paths-info/{revision}`` (form ``paths=...&expand=...``): the entries of
  the paths that exist;
- ``GET /api/datasets/{repo}/refs``: the branch ``main`` and the tags;
- ``GET /api/datasets/{repo}/commits/{revision}``: the one commit;
- ``GET /api/agent-harnesses``: an empty registry (huggingface_hub asks for it once a day, best effort).

Anything else is a 404 with the Hub's ``X-Error-Code``: ``RepoNotFound`` (another repo, another repo
type, an unknown route), ``RevisionNotFound``, ``EntryNotFound`` (with ``X-Repo-Commit``, which
``hf_hub_download`` records as the file's absence). Every answer is recorded in :attr:`MockHub.requests`
(a test can check that no client asked for a route the mock lacks: ``RepoNotFound`` on the served repo).

The repo holds one commit, reachable as ``main``, as each of ``tags`` and by its sha.

Example:
    >>> with MockHub("org/lymphatlas", {"README.md": b"..."}, tags=["v1.0.0"]) as hub:  # doctest: +SKIP
    ...     env = {**os.environ, "HF_ENDPOINT": hub.endpoint}
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_MIN_SIZE = 10 * 1024 * 1024
"""The Hub stores files of 10 MiB and more in LFS whatever their content."""
LFS_SUFFIXES = (".parquet", ".whl", ".png", ".zip", ".gz", ".arrow", ".bin", ".safetensors")
"""Patterns of the Hub's default ``.gitattributes`` (a subset) that this repo's files can match."""
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
COMMIT_DATE = "2026-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub gives as a regular file's ETag and ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


def is_lfs(path: str, data: bytes) -> bool:
    """Whether the Hub keeps ``path`` in LFS: a default LFS pattern, binary content, or 10 MiB and more."""
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or b"\0" in data[:8000]


def files_of(folder: str | Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its POSIX path relative to it (a repo laid out on disk)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Request(NamedTuple):
    """One request the mock answered: method, path with query, status, ``X-Error-Code`` of an error."""

    method: str
    path: str
    status: int
    error_code: str | None


class MockHub:
    """Serve one dataset repo ``repo_id`` holding ``files`` (path in repo -> bytes) at ``tags`` and ``main``.

    ``files`` gets a ``.gitattributes`` as the Hub's ``create_repo`` writes one, unless it has its own.
    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, repo_id: str, files: Mapping[str, bytes], *, tags: Iterable[str] = ()) -> None:
        self.repo_id = repo_id
        self.files = {".gitattributes": GITATTRIBUTES.encode(), **files}
        self.tags = list(tags)
        listing = "\n".join(f"{p} {hashlib.sha256(d).hexdigest()}" for p, d in sorted(self.files.items()))
        self.commit = hashlib.sha1(listing.encode()).hexdigest()
        self.requests: list[Request] = []
        self._lfs = {hashlib.sha256(d).hexdigest(): d for p, d in self.files.items() if is_lfs(p, d)}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> MockHub:
        hub = self

        class Handler(_Handler):
            mock = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MockHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the mock Hub is not started"
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The value for ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    def resolve_path(self, revision: str, path: str) -> str:
        """The URL path of a file as the Hub serves it: ``/datasets/{repo}/resolve/{revision}/{path}``."""
        return f"/datasets/{self.repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # -- what the repo holds ------------------------------------------------------------------
    def revision_commit(self, revision: str) -> str | None:
        return self.commit if revision in ("main", self.commit, *self.tags) else None

    def directories(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}

    def entry(self, path: str, *, expand: bool = False) -> dict | None:
        """A tree / paths-info entry of ``path``, or None where the repo has no such path."""
        last = {"lastCommit": {"id": self.commit, "title": "LymphAtlas release", "date": COMMIT_DATE}} if expand else {}
        if path in self.files:
            data = self.files[path]
            if is_lfs(path, data):
                pointer = lfs_pointer(data)
                lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
                return {"type": "file", "oid": git_blob_sha1(pointer), "size": len(data), "path": path, "lfs": lfs,
                        **last}
            return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path, **last}
        if path in self.directories():
            oid = hashlib.sha1(f"tree {path} {self.commit}".encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": path, **last}
        return None

    def tree(self, path: str, *, recursive: bool, expand: bool) -> list[dict] | None:
        """The entries under ``path`` ("" for the root), or None where it is not a directory."""
        if path and path not in self.directories():
            return None
        prefix = f"{path}/" if path else ""
        below = sorted({*self.files, *self.directories()})
        below = [p for p in below if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        directories = [p for p in below if p in self.directories()]
        return [self.entry(p, expand=expand) for p in directories + [p for p in below if p not in directories]]

    def info(self) -> dict:
        """The repo info of ``/api/datasets/{repo}[/revision/{rev}]``."""
        readme = self.files.get("README.md", b"").decode("utf-8", "replace")
        card = {}
        match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
        if match:
            import yaml

            card = yaml.safe_load(match.group(1)) or {}
        return {
            "_id": self.commit[:24], "id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.commit,
            "lastModified": COMMIT_DATE, "createdAt": COMMIT_DATE, "private": False, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": card.get("tags", []), "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(self.files)],
        }


_API = re.compile(r"^/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    mock: MockHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the requests are recorded in MockHub.requests

    # -- answers --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.mock.requests.append(Request(self.command, self.path, status, (headers or {}).get("X-Error-Code")))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(200, json.dumps(value).encode(), headers)

    def _error(self, code: str, message: str, *, status: int = 404, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _bytes(self, data: bytes, headers: dict[str, str]) -> None:
        """``data`` whole (200) or the part a ``Range: bytes=a-b`` header asks for (206, or 416)."""
        headers = {**headers, "Accept-Ranges": "bytes"}
        wanted = self.headers.get("Range")
        if wanted is None:
            self._send(200, data, headers, "application/octet-stream")
            return
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
        if not match or match.group(1) == "" and match.group(2) == "":
            self._error("BadRequest", f"unsupported Range {wanted!r}", status=400)
            return
        if match.group(1) == "":  # a suffix: the last N bytes
            start, end = max(0, len(data) - int(match.group(2))), len(data) - 1
        else:
            start = int(match.group(1))
            end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
        if start >= len(data) or end < start:
            self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            return
        self._send(206, data[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"},
                   "application/octet-stream")

    # -- routes ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._route()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._route()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self._route()

    def _route(self) -> None:
        hub = self.mock
        url = urlsplit(self.path)
        if url.path.startswith("/cdn/") and self.command in ("GET", "HEAD"):
            data = hub._lfs.get(url.path.removeprefix("/cdn/"))
            if data is None:
                self._error("EntryNotFound", "no such LFS object")
            else:
                self._bytes(data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
            return
        if url.path == "/api/agent-harnesses" and self.command == "GET":  # huggingface_hub's best-effort agent check
            self._json({"standardEnvVars": [], "harnesses": {}})
            return
        api = _API.match(url.path)
        resolve = None if api else _RESOLVE.match(url.path)
        match = api or resolve
        if match is None or match.group("kind") != "datasets" or unquote(match.group("repo")) != hub.repo_id:
            what = match.group("repo") if match else url.path
            self._error("RepoNotFound", f"Repository not found: {what} (this mock serves dataset {hub.repo_id})")
            return
        if resolve is not None and self.command in ("GET", "HEAD"):
            self._resolve(unquote(resolve.group("rev")), unquote(resolve.group("path")))
            return
        self._api(unquote(api.group("rest") or "") if api else "", url.query)

    def _commit_or_404(self, revision: str) -> str | None:
        commit = self.mock.revision_commit(revision)
        if commit is None:
            self._error("RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _resolve(self, revision: str, path: str) -> None:
        hub = self.mock
        commit = self._commit_or_404(revision)
        if commit is None:
            return
        data = hub.files.get(path)
        if data is None:
            self._error("EntryNotFound", f"{path} does not exist on \"{revision}\"", commit=commit)
            return
        if is_lfs(path, data):
            sha256 = hashlib.sha256(data).hexdigest()
            cdn = f"http://localhost:{hub.port}/cdn/{sha256}"
            self._send(302, b"", {"Location": cdn, "X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha256}"',
                                  "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(lfs_pointer(data))}"'})
            return
        self._bytes(data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit})

    def _api(self, rest: str, query: str) -> None:
        hub = self.mock
        params = parse_qs(query)
        expand = params.get("expand", ["false"])[0].lower() == "true"
        parts = rest.split("/", 2) if rest else []
        if self.command == "GET" and not parts:
            self._json(hub.info())
        elif self.command == "GET" and parts[0] == "revision" and len(parts) >= 2:
            if self._commit_or_404("/".join(parts[1:])):
                self._json(hub.info())
        elif self.command == "GET" and parts[0] == "tree" and len(parts) >= 2:
            if self._commit_or_404(parts[1]):
                recursive = params.get("recursive", ["false"])[0].lower() == "true"
                entries = hub.tree(parts[2] if len(parts) > 2 else "", recursive=recursive, expand=expand)
                if entries is None:
                    self._error("EntryNotFound", f"{parts[2]} is not a directory of {hub.repo_id}", commit=hub.commit)
                else:
                    self._json(entries)
        elif self.command == "POST" and parts[0] == "paths-info" and len(parts) >= 2:
            if self._commit_or_404("/".join(parts[1:])):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                form = json.loads(body) if body.startswith("{") else parse_qs(body)
                paths = form.get("paths", [])
                expand = str(form.get("expand", ["false"])[0] if isinstance(form.get("expand"), list)
                             else form.get("expand")).lower() == "true"
                self._json([e for p in paths if (e := hub.entry(p.strip("/"), expand=expand)) is not None])
        elif self.command == "GET" and parts == ["refs"]:
            ref = lambda name, kind: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": hub.commit}  # noqa: E731
            self._json({"branches": [ref("main", "heads")], "converts": [], "tags": [ref(t, "tags") for t in hub.tags]})
        elif self.command == "GET" and parts[0] == "commits" and len(parts) >= 2:
            if self._commit_or_404("/".join(parts[1:])):
                self._json([{"id": hub.commit, "title": "LymphAtlas release", "message": "", "authors": [],
                             "date": COMMIT_DATE}])
        else:
            self._error("RepoNotFound", f"this mock Hub does not serve {self.command} /api/datasets/{hub.repo_id}/{rest}")
