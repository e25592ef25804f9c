"""Local stand-ins for the Hugging Face hub, for tests: 127.0.0.1 only, each stops by itself.

    with hubserver.serve({"openai/clip-vit-base-patch16": folder}) as hub:
        env = hubserver.hub_env(hub.url, cache)   # HF_ENDPOINT=hub.url, online, empty cache
        subprocess.run([...], env=env)            # hf_hub_download / `hf download` read `folder`
        hub.requests                              # [("GET", "/openai/.../config.json"), ...]

    with hubserver.silent() as url:               # accepts connections, never answers
        ...

`serve` answers what huggingface_hub asks for: HEAD and GET `/<repo>/resolve/<revision>/<file>`
with the headers hf_hub_download needs (X-Repo-Commit, ETag, Content-Length), a 404 with
`X-Error-Code: EntryNotFound` / `RepoNotFound` for a missing file / repo (so hf_hub_download
raises the same errors as on the real hub), and the two API routes snapshot_download (`hf
download` with several files) uses: `/api/models/<repo>/revision/<revision>` and
`/api/models/<repo>/tree/<revision>`. Every repo is one commit, named by the sha1 of its id, on
branch `main`. Subprocesses are the clean way to point huggingface_hub at a server: it reads
HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE once, at import.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)")
API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<route>revision|tree)/(?P<revision>[^/]+)")


def commit_of(repo_id: str) -> str:
    """The one commit of a served repo: 40 hex digits, as X-Repo-Commit and the API give it."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def blob_id(data: bytes) -> str:
    """git's blob sha1, the id the hub gives (oid, ETag) for a file that is not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    """A running local hub: `url` to use as HF_ENDPOINT; `requests` seen so far, in order."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    def files(self, repo: str) -> dict[str, Path]:
        folder = self.repos[repo]
        return {
            p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }


def _handler(hub: Hub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

        def log_message(self, *args):  # quiet; `hub.requests` is the log
            pass

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def send(self, status: int, data: bytes, headers: dict[str, str], body: bool):
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def answer(self, body: bool):
            path = self.path.split("?", 1)[0]
            hub.requests.append((self.command, path))
            resolve, api = RESOLVE.fullmatch(path), API.fullmatch(path)
            match = resolve or api
            repo = match["repo"] if match else None
            if repo not in hub.repos:
                error = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
                return self.send(404, b"{}", error, body)
            commit = commit_of(repo)
            if match["revision"] not in ("main", commit):
                error = {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}
                return self.send(404, b"{}", error, body)
            files = hub.files(repo)
            if api:
                listing = [
                    {
                        "type": "file",
                        "path": name,
                        "size": p.stat().st_size,
                        "oid": blob_id(p.read_bytes()),
                    }
                    for name, p in files.items()
                ]
                siblings = [{"rfilename": name} for name in files]
                info = {"id": repo, "sha": commit, "siblings": siblings}
                data = json.dumps(listing if api["route"] == "tree" else info).encode()
                return self.send(200, data, {"Content-Type": "application/json"}, body)
            if resolve["file"] not in files:
                error = {
                    "X-Error-Code": "EntryNotFound",
                    "X-Error-Message": "Entry not found",
                    "X-Repo-Commit": commit,
                }
                return self.send(404, b"{}", error, body)
            data = files[resolve["file"]].read_bytes()
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{blob_id(data)}"',
                "Content-Type": "application/octet-stream",
            }
            self.send(200, data, headers, body)

    return Handler


@contextlib.contextmanager
def serve(repos: dict[str, str | os.PathLike], lifetime: float = 120.0) -> Iterator[Hub]:
    """Serves each `repos[id]` folder as hub repo `id` until the block ends or `lifetime` s pass."""
    hub = Hub(repos)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    timer = threading.Timer(lifetime, server.shutdown)  # stops by itself if the test hangs
    timer.daemon = True
    timer.start()
    try:
        yield hub
    finally:
        timer.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def silent(lifetime: float = 90.0) -> Iterator[str]:
    """An endpoint (its URL) that accepts every connection and never sends a byte: a stalled hub.

    Held connections are closed when the block ends or after `lifetime` s, whichever is first."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    stop = threading.Event()
    deadline = time.monotonic() + lifetime

    def hold():
        held = []
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                pass
        for conn in held:
            conn.close()
        listener.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)


def hub_env(endpoint: str, cache: str | os.PathLike, **extra: str) -> dict[str, str]:
    """Environment for a subprocess using `endpoint` as the hub, online, with `cache` as HF_HOME
    (nothing from the user's cache or token), importing this checkout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "HF_TOKEN", "HF_HUB_CACHE")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(cache),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env
