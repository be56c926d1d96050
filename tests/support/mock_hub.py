"""A local stand-in for the Hugging Face Hub's HTTP API: one dataset repo on 127.0.0.1, read and written.

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
- ``GET /api/datasets/{repo}/commits/{revision}``: the commits of ``main`` up to that revision, newest first;
- ``GET /api/agent-harnesses``: an empty registry (huggingface_hub asks for it once a day, best effort).

and what ``HfApi.create_repo`` / ``create_commit`` / ``create_tag`` send (hf_api.py, _commit_api.py,
lfs.py), each with ``Authorization: Bearer <token>`` when the mock has a ``token`` (401 otherwise):

- ``POST /api/repos/create`` (json ``name``, ``organization``, ``type``): the repo with a first commit
  holding ``.gitattributes``, as the Hub makes it; 409 when it exists (``exist_ok`` accepts that);
- ``POST /api/datasets/{repo}/preupload/{revision}`` (json ``files``: ``path``, ``sample``, ``size``):
  each file's ``uploadMode`` (``lfs`` or ``regular``, by :func:`is_lfs` on the sample and the size);
- ``POST /datasets/{repo}.git/info/lfs/objects/batch`` (git-lfs batch API, ``basic`` transfer): an
  ``upload`` action to ``PUT /lfs-upload/{sha256}`` for each object the mock lacks, none for the others;
- ``PUT /lfs-upload/{sha256}?sig=...``: the object's bytes, at the URL the batch answer signed (no token,
  as to the Hub's storage bucket; refused when their sha256 is not the name);
- ``POST /api/datasets/{repo}/commit/{branch}`` (NDJSON: ``header``, ``file`` base64, ``lfsFile``
  of an uploaded object, ``deletedFile``, ``deletedFolder``): a new commit on ``main``
  (``commitOid``, ``commitUrl``); 412 when ``parentCommit`` is not the head;
- ``POST /api/datasets/{repo}/tag/{revision}`` (json ``tag``, ``message``): the tag; 409 if it exists;
- ``POST /api/validate-yaml`` (json ``content``): 400 when the README's front matter is not a YAML mapping.

Uploads take the legacy LFS path: the client process needs ``HF_HUB_DISABLE_XET=1`` (with ``hf_xet``
installed, huggingface_hub uploads through Xet storage, whose CAS service this mock does not offer).

Anything else is a 404 with the Hub's ``X-Error-Code``: ``RepoNotFound`` (another repo, another repo
type, an unknown route), ``RevisionNotFound``, ``EntryNotFound`` (with ``X-Repo-Commit``, which
``hf_hub_download`` records as the file's absence). Every answer is recorded in :attr:`MockHub.requests`
(a test can check that no client asked for a route the mock lacks: ``RepoNotFound`` on the served repo).

Built with ``files``, the repo holds one commit, reachable as ``main``, as each of ``tags`` and by its
sha; built with ``files=None`` it does not exist until a client creates it. Every commit stays
readable by its sha and by the tags made on it (:attr:`MockHub.commits`).

Example:
    >>> with MockHub("org/lymphatlas", {"README.md": b"..."}, tags=["v1.0.0"]) as hub:  # doctest: +SKIP
    ...     env = {**os.environ, "HF_ENDPOINT": hub.endpoint}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
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
_CHUNK = 256 * 1024


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

    def __init__(self, repo_id: str, files: Mapping[str, bytes] | None, *, tags: Iterable[str] = (),
                 bytes_per_second: float | None = None, token: str | None = None) -> None:
        self.repo_id = repo_id
        self.bytes_per_second = bytes_per_second
        self.token = token
        self.commits: dict[str, dict[str, bytes]] = {}
        """Every commit's files by its sha."""
        self.history: list[str] = []
        """The commits of ``main``, oldest first."""
        self.tag_commits: dict[str, str] = {}
        self.requests: list[Request] = []
        self._lfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if files is not None:
            self.add_commit({".gitattributes": GITATTRIBUTES.encode(), **files})
            self.tag_commits.update((tag, self.commit) for tag in tags)

    @property
    def exists(self) -> bool:
        return bool(self.history)

    @property
    def commit(self) -> str:
        """The head of ``main``."""
        return self.history[-1]

    @property
    def files(self) -> dict[str, bytes]:
        """The files at the head of ``main``."""
        return self.commits[self.commit] if self.history else {}

    @property
    def tags(self) -> list[str]:
        return list(self.tag_commits)

    def upload_signature(self, oid: str) -> str:
        """What signs the upload URL of LFS object ``oid`` in a batch answer."""
        return hashlib.sha256(f"{self.token}:{oid}".encode()).hexdigest()[:32]

    def add_commit(self, files: dict[str, bytes]) -> str:
        """Make ``files`` the next commit of ``main``; their LFS objects become downloadable. Returns its sha."""
        parent = self.history[-1] if self.history else ""
        listing = "\n".join(f"{p} {hashlib.sha256(d).hexdigest()}" for p, d in sorted(files.items()))
        sha = hashlib.sha1(f"{parent}\n{listing}".encode()).hexdigest()
        self._lfs.update((hashlib.sha256(d).hexdigest(), d) for p, d in files.items() if is_lfs(p, d))
        self.commits[sha] = dict(files)
        self.history.append(sha)
        return sha

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
        if not self.history:
            return None
        if revision == "main":
            return self.commit
        return revision if revision in self.commits else self.tag_commits.get(revision)

    def directories(self, commit: str | None = None) -> set[str]:
        files = self.commits[commit or self.commit]
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    def entry(self, path: str, *, expand: bool = False, commit: str | None = None) -> dict | None:
        """A tree / paths-info entry of ``path`` at ``commit`` (the head), or None where it has no such path."""
        commit = commit or self.commit
        files = self.commits[commit]
        last = {"lastCommit": {"id": commit, "title": "LymphAtlas release", "date": COMMIT_DATE}} if expand else {}
        if path in files:
            data = files[path]
            if is_lfs(path, data):
                pointer = lfs_pointer(data)
                lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
                return {"type": "file", "oid": git_blob_sha1(pointer), "size": len(data), "path": path, "lfs": lfs,
                        **last}
            return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path, **last}
        if path in self.directories(commit):
            oid = hashlib.sha1(f"tree {path} {commit}".encode()).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": path, **last}
        return None

    def tree(self, path: str, *, recursive: bool, expand: bool, commit: str | None = None) -> list[dict] | None:
        """The entries under ``path`` ("" for the root) at ``commit``, or None where it is not a directory."""
        commit = commit or self.commit
        dirs = self.directories(commit)
        if path and path not in dirs:
            return None
        prefix = f"{path}/" if path else ""
        below = sorted({*self.commits[commit], *dirs})
        below = [p for p in below if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        directories = [p for p in below if p in dirs]
        return [self.entry(p, expand=expand, commit=commit)
                for p in directories + [p for p in below if p not in directories]]

    def info(self, commit: str | None = None) -> dict:
        """The repo info of ``/api/datasets/{repo}[/revision/{rev}]``."""
        commit = commit or self.commit
        files = self.commits[commit]
        readme = files.get("README.md", b"").decode("utf-8", "replace")
        card = {}
        match = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
        if match:
            import yaml

            card = yaml.safe_load(match.group(1)) or {}
        return {
            "_id": self.history[0][:24], "id": self.repo_id, "author": self.repo_id.split("/")[0], "sha": commit,
            "lastModified": COMMIT_DATE, "createdAt": COMMIT_DATE, "private": False, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": card.get("tags", []), "cardData": card,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }


_API = re.compile(r"^/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/(?P<rest>.*))?$")
_LFS_BATCH = re.compile(r"/datasets/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch")
_WRITE = re.compile(r"^(/api/repos/create|/lfs-upload/.*|/datasets/[^/]+/[^/]+\.git/info/lfs/objects/batch"
                    r"|/api/datasets/[^/]+/[^/]+/(preupload|commit|tag)/.*)$")
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
        if self.command == "HEAD":
            return
        rate = self.mock.bytes_per_second
        if rate is None or len(body) < _CHUNK:
            self.wfile.write(body)
            return
        view = memoryview(body)
        for start in range(0, len(body), _CHUNK):  # a network's pace: bodies take their time to arrive
            self.wfile.write(view[start : start + _CHUNK])
            time.sleep(_CHUNK / rate)

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

    def do_PUT(self) -> None:  # noqa: N802 - http.server's name
        self._route()

    def _body(self) -> bytes:
        """The request's body, sent with ``Content-Length`` or chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        """Whether a write carries the mock's token (any token when the mock has none); a 401 answered if not."""
        token = self.mock.token
        if token is None or self.headers.get("Authorization") == f"Bearer {token}":
            return True
        self._body()
        self._error("Unauthorized", "Invalid credentials in Authorization header", status=401)
        return False

    def _route(self) -> None:
        hub = self.mock
        url = urlsplit(self.path)
        if self.command in ("POST", "PUT") and _WRITE.match(url.path):
            # an LFS upload goes to the URL the batch answer signed (as to a storage bucket), without the token
            signed = url.path.startswith("/lfs-upload/") and parse_qs(url.query).get("sig") == [
                hub.upload_signature(url.path.removeprefix("/lfs-upload/"))]
            if signed or self._authorized():
                with hub._lock:
                    self._write(url.path)
            return
        if url.path.startswith("/cdn/") and self.command in ("GET", "HEAD"):
            data = hub._lfs.get(url.path.removeprefix("/cdn/"))
            if data is None:
                self._error("EntryNotFound", "no such LFS object")
            else:
                self._bytes(data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
            return
        if url.path == "/api/validate-yaml" and self.command == "POST":  # create_commit checks a README's metadata
            self._validate_yaml(json.loads(self._body())["content"])
            return
        if url.path == "/api/agent-harnesses" and self.command == "GET":  # huggingface_hub's best-effort agent check
            self._json({"standardEnvVars": [], "harnesses": {}})
            return
        api = _API.match(url.path)
        resolve = None if api else _RESOLVE.match(url.path)
        match = api or resolve
        if (match is None or match.group("kind") != "datasets" or unquote(match.group("repo")) != hub.repo_id
                or not hub.exists):
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
        data = hub.commits[commit].get(path)
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
            if commit := self._commit_or_404("/".join(parts[1:])):
                self._json(hub.info(commit))
        elif self.command == "GET" and parts[0] == "tree" and len(parts) >= 2:
            if commit := self._commit_or_404(parts[1]):
                recursive = params.get("recursive", ["false"])[0].lower() == "true"
                entries = hub.tree(parts[2] if len(parts) > 2 else "", recursive=recursive, expand=expand,
                                   commit=commit)
                if entries is None:
                    self._error("EntryNotFound", f"{parts[2]} is not a directory of {hub.repo_id}", commit=commit)
                else:
                    self._json(entries)
        elif self.command == "POST" and parts[0] == "paths-info" and len(parts) >= 2:
            if commit := self._commit_or_404("/".join(parts[1:])):
                body = self._body().decode()
                form = json.loads(body) if body.startswith("{") else parse_qs(body)
                paths = form.get("paths", [])
                expand = str(form.get("expand", ["false"])[0] if isinstance(form.get("expand"), list)
                             else form.get("expand")).lower() == "true"
                self._json([e for p in paths if (e := hub.entry(p.strip("/"), expand=expand, commit=commit)) is not None])
        elif self.command == "GET" and parts == ["refs"]:
            ref = lambda name, kind, sha: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}  # noqa: E731
            self._json({"branches": [ref("main", "heads", hub.commit)], "converts": [],
                        "tags": [ref(t, "tags", sha) for t, sha in hub.tag_commits.items()]})
        elif self.command == "GET" and parts[0] == "commits" and len(parts) >= 2:
            if commit := self._commit_or_404("/".join(parts[1:])):
                upto = hub.history[: hub.history.index(commit) + 1] if commit in hub.history else [commit]
                self._json([{"id": sha, "title": "LymphAtlas release", "message": "", "authors": [], "date": COMMIT_DATE}
                            for sha in reversed(upto)])
        else:
            self._error("RepoNotFound", f"this mock Hub does not serve {self.command} /api/datasets/{hub.repo_id}/{rest}")

    # -- writes -----------------------------------------------------------------------------------
    def _validate_yaml(self, content: str) -> None:
        """The card's front matter must be a YAML mapping (the Hub also checks its fields: not done here)."""
        import yaml

        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            metadata = e
        if not isinstance(metadata, dict):
            self._send(400, json.dumps({"errors": [{"message": f"invalid YAML metadata: {metadata}"}]}).encode(),
                       {"X-Error-Code": "BadRequest"})
        else:
            self._json({"warnings": []})

    def _write(self, path: str) -> None:
        """The write routes (the hub's lock held): create, preupload, LFS batch and upload, commit, tag."""
        hub = self.mock
        body = self._body()
        if path == "/api/repos/create":
            form = json.loads(body)
            name = f"{form['organization']}/{form['name']}" if form.get("organization") else form["name"]
            if form.get("type") != "dataset" or name != hub.repo_id:
                self._error("Forbidden", f"this mock Hub hosts only dataset {hub.repo_id}, not {form}", status=403)
            elif hub.exists:  # the Hub's answer names the repo's url (create_repo(exist_ok=True) returns it)
                self._send(409, json.dumps({"error": "You already created this dataset repo",
                                            "url": f"{hub.endpoint}/datasets/{hub.repo_id}"}).encode(),
                           {"X-Error-Code": "Conflict"})
            else:
                hub.add_commit({".gitattributes": GITATTRIBUTES.encode()})
                self._json({"url": f"{hub.endpoint}/datasets/{hub.repo_id}", "name": hub.repo_id})
            return
        upload = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if upload:
            if hashlib.sha256(body).hexdigest() != upload.group(1):
                self._error("BadRequest", "the uploaded bytes do not have the announced sha256", status=400)
            else:
                hub._lfs[upload.group(1)] = body
                self._send(200)
            return
        batch = _LFS_BATCH.fullmatch(path)
        if batch:
            if unquote(batch.group("repo")) != hub.repo_id or not hub.exists:
                self._error("RepoNotFound", f"Repository not found: {batch.group('repo')}")
                return
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub._lfs:
                    href = f"{hub.endpoint}/lfs-upload/{obj['oid']}?sig={hub.upload_signature(obj['oid'])}"
                    entry["actions"] = {"upload": {"href": href, "header": {}}}
                objects.append(entry)
            self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                       content_type="application/vnd.git-lfs+json")
            return
        api = _API.match(path)
        if api is None or api.group("kind") != "datasets" or unquote(api.group("repo")) != hub.repo_id or not hub.exists:
            self._error("RepoNotFound", f"Repository not found: {path}")
            return
        action, _, revision = (api.group("rest") or "").partition("/")
        revision = unquote(revision)
        commit = self._commit_or_404(revision)
        if commit is None:
            return
        if action == "preupload":
            files = []
            for f in json.loads(body)["files"]:
                lfs = is_lfs(f["path"], base64.b64decode(f["sample"])) or f["size"] >= LFS_MIN_SIZE
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": None})
            self._json({"files": files, "commitOid": commit})
        elif action == "commit":
            self._commit(revision, [json.loads(line) for line in body.splitlines() if line.strip()])
        elif action == "tag":
            tag = json.loads(body)["tag"]
            if tag in hub.tag_commits:
                self._error("Conflict", f"Tag {tag} already exists", status=409)
            else:
                hub.tag_commits[tag] = commit
                self._json({})
        else:
            self._error("RepoNotFound", f"this mock Hub does not serve POST {path}")

    def _commit(self, branch: str, lines: list[dict]) -> None:
        hub = self.mock
        if branch != "main":
            self._error("RevisionNotFound", f"this mock Hub commits to main only, not {branch}")
            return
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != hub.commit:
            self._error("PreconditionFailed", f"parent commit {parent} is not the head of main", status=412)
            return
        files = dict(hub.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = hub._lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    self._error("BadRequest", f"LFS object {value['oid']} of {value['path']} was not uploaded",
                                status=422)
                    return
                files[value["path"]] = data
            elif key == "deletedFile":
                if value["path"] not in files:
                    self._error("EntryNotFound", f"{value['path']} does not exist on main", status=404)
                    return
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            elif key != "header":
                self._error("BadRequest", f"unknown commit operation {key!r}", status=400)
                return
        sha = hub.add_commit(files)
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{hub.endpoint}/datasets/{hub.repo_id}/commit/{sha}",
                    "commitMessage": header.get("summary", ""), "pullRequestUrl": None})
