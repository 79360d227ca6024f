"""A loopback Hub-compatible HTTP server for tests: the subset of the Hub API huggingface_hub's client uses
for create_repo / create_branch / upload_folder / repo_info / list_repo_tree / snapshot_download /
hf_hub_download / whoami. In memory, bound to 127.0.0.1 on a free port, stopped by the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

TOKEN = "hf_test_token"
USER = "tester"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Store:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # id -> {"private", "branches": {name: sha}, "commits": {sha: files}}
        self.lock = threading.Lock()

    def create(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            sha = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            self.repos[repo_id] = {"private": private, "branches": {"main": sha}, "commits": {sha: {}}}
            return True

    def resolve(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos[repo_id]
        if rev in repo["branches"]:
            return repo["branches"][rev]
        return rev if rev in repo["commits"] else None


class Handler(BaseHTTPRequestHandler):
    store: Store
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ---- helpers
    def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, head: bool = False):
        self._send(code, {"error": error_code}, {"X-Error-Code": error_code}, head=head)

    def _authed(self) -> bool:
        return self.headers.get("authorization") == f"Bearer {TOKEN}"

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str, head: bool = False) -> dict | None:
        repo = self.store.repos.get(repo_id)
        if repo is None or (repo["private"] and not self._authed()):
            self._error(404, "RepoNotFound", head)
            return None
        return repo

    def _revision(self, repo_id: str, rev: str, head: bool = False) -> tuple[dict, str] | None:
        """The repo and the commit ``rev`` names, or None after answering 404 as the hub does."""
        repo = self._repo(repo_id, head)
        if repo is None:
            return None
        sha = self.store.resolve(repo_id, rev)
        if sha is None:
            self._error(404, "RevisionNotFound", head)
            return None
        return repo, sha

    # ---- routes
    def do_GET(self, head: bool = False):
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._send(200, {"name": USER, "type": "user"}) if self._authed() else self._error(401, "Unauthorized")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            found = self._revision(m[1], m[2] or "main")
            if found is None:
                return
            repo, sha = found
            files = repo["commits"][sha]
            return self._send(200, {"id": m[1], "modelId": m[1], "sha": sha, "private": repo["private"],
                                    "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            found = self._revision(m[1], m[2])
            if found is None:
                return
            repo, sha = found
            files = repo["commits"][sha]
            return self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": git_blob_id(d)}
                                    for p, d in sorted(files.items())])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            found = self._revision(m[1], m[2], head)
            if found is None:
                return
            repo, sha = found
            data = repo["commits"][sha].get(m[3])
            if data is None:
                return self._error(404, "EntryNotFound", head)
            return self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"',
                                          "Content-Type": "application/octet-stream"}, head=head)
        self._error(404, "NotFound")

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if not self._authed():
            return self._error(401, "Unauthorized")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization') or USER}/{req['name']}"
            created = self.store.create(repo_id, bool(req.get("private")))
            return self._send(200 if created else 409, {"url": f"http://{self.headers['Host']}/{repo_id}",
                                                        "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if m:
            repo = self._repo(m[1])
            if repo is None:
                return
            if m[2] not in repo["branches"]:
                repo["branches"][m[2]] = repo["branches"]["main"]
            return self._send(200, {})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if m:
            if self._repo(m[1]) is None:
                return
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if m:
            found = self._revision(m[1], m[2])
            if found is None:
                return
            repo, parent = found
            files = dict(repo["commits"][parent])
            summary = ""
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    summary = item["value"].get("summary", "")
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    files.pop(item["value"]["path"], None)
            sha = hashlib.sha1(f"{parent}{summary}{sorted(files)}{len(repo['commits'])}".encode()).hexdigest()
            with self.store.lock:
                repo["commits"][sha] = files
                repo["branches"][m[2]] = sha
                repo.setdefault("messages", {})[sha] = summary
            host = self.headers["Host"]
            return self._send(200, {"commitUrl": f"http://{host}/{m[1]}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})
        self._error(404, "NotFound")


class HubServer:
    """Start with ``HubServer()``, use ``.url``, stop with ``.stop()``."""

    def __init__(self):
        self.store = Store()
        handler = type("BoundHandler", (Handler,), {"store": self.store})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
