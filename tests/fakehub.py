"""A small local stand-in for the Hugging Face Hub HTTP API, enough for `snapshot_download` / `hf_hub_download`.

huggingface_hub 2.4.0 downloads a snapshot with these calls (see its `_snapshot_download.py`, `file_download.py`,
`hf_api.py`), and this server answers exactly them:

    GET  /api/models/{owner}/{name}[/revision/{rev}]       repo info: `sha` (the commit a branch resolves to),
                                                           `siblings`
    GET  /api/models/{owner}/{name}/tree/{rev}[/{path}]     file listing (`?recursive=true`): path, size, git oid,
                                                           `lfs` {oid (sha256), size, pointerSize} for LFS files
    HEAD /{owner}/{name}/resolve/{rev}/{path}              metadata: X-Repo-Commit, ETag, Content-Length, and for
                                                           LFS files X-Linked-Etag / X-Linked-Size
    GET  /{owner}/{name}/resolve/{rev}/{path}              the bytes; `Range: bytes=a-[b]` gives 206 + Content-Range
    GET  /api/agent-harnesses                              an empty registry (the client's user-agent tagging)

No Xet headers are ever sent, so the client takes the plain HTTP download path. Errors carry the Hub's
`X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so huggingface_hub raises its usual exception types.

Private repos answer like the Hub: 401 + RepoNotFound without a token, 401 "Invalid credentials" with a wrong one.

Test hooks: `requests` (every request: method, path, repo, file, Range, whether it carried a token),
`cut_after[(repo, file)] = N` (the next GET of that file sends its headers and N body bytes, then closes the
connection cleanly: a short read), `reset_after[(repo, file)] = N` (the same, but ends with a TCP reset),
per-repo `token` (401 unless `Authorization: Bearer <token>`), and `max_requests` (a hard cap: past it every
request gets a 400, so a client stuck in a loop fails fast instead of hanging a test). The server binds 127.0.0.1
on a free port; idle connections time out after 10 s.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".png", ".bin", ".pt")
CHUNK = 64 * 1024

_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool
    git_oid: str = ""
    sha256: str = ""
    pointer_size: int = 0

    def __post_init__(self):
        if self.lfs:
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                       f"size {len(self.data)}\n").encode()
            self.pointer_size = len(pointer)
            blob = pointer
        else:
            blob = self.data
        self.git_oid = hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    token: str | None = None
    branch: str = "main"
    sha: str = ""

    def __post_init__(self):
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            h.update(f"{name}\0{self.files[name].git_oid}\n".encode())
        self.sha = h.hexdigest()

    def resolve(self, rev: str) -> str | None:
        return self.sha if rev in (self.branch, self.sha) else None

    def folders(self) -> list[str]:
        out = set()
        for name in self.files:
            parts = name.split("/")[:-1]
            out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return sorted(out)


@dataclass
class Request:
    method: str
    path: str
    repo: str | None = None
    file: str | None = None
    range: str | None = None
    authorized: bool = False
    status: int = 0


def files_from(folder: Path, prefix: str = "", pattern: str = "*") -> dict[str, bytes]:
    """{repo path: bytes} for the files of a local folder (flat), put under `prefix` in the repo."""
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


class FakeHub:
    def __init__(self, max_requests: int = 500):
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.cut_after: dict[tuple[str, str], int] = {}
        self.reset_after: dict[tuple[str, str], int] = {}
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content --------------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None) -> HubRepo:
        entries = {name: HubFile(name, data, lfs=name.endswith(LFS_SUFFIXES)) for name, data in files.items()}
        repo = HubRepo(repo_id, entries, token=token)
        self.repos[repo_id] = repo
        return repo

    # -- inspection -----------------------------------------------------------------------------------------------

    def log(self, method: str | None = None, repo: str | None = None, file: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (repo is None or r.repo == repo) and (file is None or r.file == file)]

    def files_requested(self, repo: str) -> set[str]:
        return {r.file for r in self.log(repo=repo) if r.file is not None}

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()

    def reset(self) -> None:
        """Forget the request log and any pending cut-off or reset."""
        with self.lock:
            self.requests.clear()
            self.cut_after.clear()
            self.reset_after.clear()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False      # stop() does not wait for idle keep-alive connections
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakehub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"       # keep-alive, like the real Hub; every response carries Content-Length
    timeout = 10                        # an idle or stuck connection ends after 10 s: no unbounded server loop

    def log_message(self, format, *args):   # quiet: the request log is in hub.requests
        pass

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _record(self) -> Request | None:
        req = Request(self.command, urlsplit(self.path).path, range=self.headers.get("Range"),
                      authorized=self.headers.get("Authorization") is not None)
        with self.hub.lock:
            if len(self.hub.requests) >= self.hub.max_requests:
                over = True
            else:
                over = False
                self.hub.requests.append(req)
        if over:
            self._send_json(400, {"error": f"fakehub: more than {self.hub.max_requests} requests"})
            return None
        return req

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", req: Request | None = None) -> None:
        if req is not None:
            req.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, obj, headers: dict[str, str] | None = None, req: Request | None = None):
        body = json.dumps(obj).encode()
        self._send(status, {"Content-Type": "application/json", **(headers or {})}, body, req)

    def _error(self, req: Request, status: int, code: str | None, message: str, extra: dict | None = None):
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send_json(status, {"error": message}, headers, req)

    def _repo(self, req: Request, repo_id: str) -> HubRepo | None:
        """The repo, if it exists and the request may see it; else an error has been sent (the Hub's way)."""
        req.repo = repo_id
        repo = self.hub.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is not None and repo.token is not None and auth is not None and auth != f"Bearer {repo.token}":
            self._error(req, 401, None, "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.token is not None and auth is None):
            # anonymous callers get 401 for both missing and private repos; authenticated ones 404
            self._error(req, 404 if auth else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    # -- routes ---------------------------------------------------------------------------------------------------

    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route()

    def _route(self):
        req = self._record()
        if req is None:
            return
        if req.path == "/api/agent-harnesses" and self.command == "GET":
            # huggingface_hub fetches this registry (at most daily, cached in HF_HOME) to tag its user agent
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}}, req=req)
        m = _API.match(req.path)
        if m and self.command == "GET":
            return self._api(req, m.group(1), m.group(2), unquote(m.group(3) or "main"), unquote(m.group(4) or ""))
        m = _RESOLVE.match(req.path)
        if m:
            return self._resolve(req, m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        self._error(req, 404, None, "Not found")

    def _repo_at(self, req: Request, repo_id: str, rev: str):
        """(repo, commit sha), or None after answering the error (unknown repo, no access, unknown revision)."""
        repo = self._repo(req, repo_id)
        if repo is None:
            return None
        sha = repo.resolve(rev)
        if sha is None:
            self._error(req, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, sha

    def _api(self, req: Request, repo_id: str, kind: str | None, rev: str, sub: str):
        found = self._repo_at(req, repo_id, rev)
        if found is None:
            return
        repo, sha = found
        if kind != "tree":
            return self._send_json(200, {
                "_id": repo.sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": sha, "private": repo.token is not None, "gated": False, "disabled": False,
                "lastModified": "2026-01-01T00:00:00.000Z", "tags": [],
                "siblings": [{"rfilename": n} for n in sorted(repo.files)]}, req=req)
        query = urlsplit(self.path).query.lower()
        recursive = "recursive=true" in query or "recursive=1" in query
        base = sub.strip("/")
        prefix = base + "/" if base else ""
        entries = []
        for folder in repo.folders():
            if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix):]):
                entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                                "path": folder})
        for name, f in sorted(repo.files.items()):
            if name.startswith(prefix) and (recursive or "/" not in name[len(prefix):]):
                e = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": name}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
                entries.append(e)
        if base and not entries:
            return self._error(req, 404, "EntryNotFound", f"{base} does not exist on {rev}")
        self._send_json(200, entries, req=req)

    def _resolve(self, req: Request, repo_id: str, rev: str, name: str):
        found = self._repo_at(req, repo_id, rev)
        if found is None:
            return
        repo, sha = found
        req.file = name
        f = repo.files.get(name)
        if f is None:
            return self._error(req, 404, "EntryNotFound", f"{name} does not exist on {rev}", {"X-Repo-Commit": sha})
        size = len(f.data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        if req.range is not None:
            m = _RANGE.match(req.range.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._error(req, 416, None, f"bad range {req.range}", {"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start = max(size - int(m.group(2)), 0)
            if start >= size or start > end:
                return self._error(req, 416, None, f"range {req.range} not satisfiable",
                                   {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        headers["Content-Length"] = str(length)
        req.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.hub.lock:
            cut = self.hub.cut_after.pop((repo_id, name), None)
            reset = self.hub.reset_after.pop((repo_id, name), None)
        body = memoryview(f.data)[start:end + 1]
        if cut is not None and cut < length:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            # A clean close (FIN) in the middle of the announced body: the client sees a short read.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if reset is not None and reset < length:
            self.wfile.write(body[:reset])
            self.wfile.flush()
            # An abortive close (RST, as from a dropped NAT entry or a proxy): "connection reset by peer".
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        for i in range(0, length, CHUNK):
            self.wfile.write(body[i:i + CHUNK])
