"""The hub as a new user meets it: unreachable, answering "no such model", or switched off with
HF_HUB_OFFLINE=1. Each failure is one error, at once, saying which of these it is; a model that
exists is fetched (only the files a merge needs) and then works from the cache offline.

No network is needed: an endpoint with nothing listening, a name that cannot resolve, a socket
that never answers, and a small local server that answers like the hub (tests/fake_hub below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from tests.conftest import write_recipe

Family = tuple[Path, list[Path]]
# Five retries with backoff sleep 23 s; failing at once takes well under a second of work.
AT_ONCE_S = 10.0
COMMIT = "c" * 40


class FakeHub(ThreadingHTTPServer):
    """Answers the requests huggingface_hub makes (model info, HEAD and GET of files) the way the
    hub does, including its X-Error-Code headers; records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, repo: str, folder: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.repos[repo] = {**files, **(extra or {})}

    def fetched(self, repo: str) -> set[str]:
        """The files of `repo` whose bytes were asked for (GET)."""
        prefix = f"/{repo}/resolve/"
        with self.lock:
            return {
                p[len(prefix) :].split("/", 1)[1]
                for m, p in self.requests
                if m == "GET" and p.startswith(prefix)
            }


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            self.server.requests.append((self.command, path))
        if path.startswith("/api/models/"):
            repo, _, revision = path.removeprefix("/api/models/").partition("/revision/")
            if self._missing(repo, revision or "main"):
                return
            info = {
                "id": repo,
                "sha": COMMIT,
                "siblings": [{"rfilename": n} for n in sorted(self.server.repos[repo])],
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
            return
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match is None:
            self._send(404, b"", {}, body)
            return
        repo, revision, name = match.groups()
        if self._missing(repo, revision):
            return
        if repo in self.server.gated:
            self._send(403, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"}, body)
            return
        data = self.server.repos[repo].get(name)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
            self._send(404, b"", headers, body)
            return
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(200, data, headers, body)

    def _missing(self, repo: str, revision: str) -> bool:
        if repo not in self.server.repos:
            headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            self._send(404, b"", headers, True)
            return True
        if revision not in ("main", COMMIT):
            self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, True)
            return True
        return False

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body and data and self.command != "HEAD":
            self.wfile.write(data)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class SilentServer:
    """Accepts connections and never answers: a hub behind a firewall that drops replies."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            conn.close()


def closed_port() -> int:
    """A local port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The CLI, with the time from the start of its work (imports done) to its exit written last on
# stderr: a process start costs seconds on a loaded machine, retries cost 23 s or more of sleep.
CLI_TIMED = """
import sys, time
import torch, huggingface_hub, mergesmith.api, mergesmith.cli
start = time.monotonic()
code = 0
try:
    mergesmith.cli.cli.main(sys.argv[1:], prog_name="mergesmith")
except SystemExit as done:
    code = done.code
print(f"elapsed: {time.monotonic() - start:.3f}", file=sys.stderr)
sys.exit(code)
"""


def run_hub_cli(
    home: Path, *args: str | Path, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI with its own hub cache and only the hub settings given (no proxy, online
    unless HF_HUB_OFFLINE is given); returns the result (its `elapsed:` line removed) and the
    seconds its work took."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))
        and k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    }
    full = {
        **base,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", CLI_TIMED, *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=180,
    )
    *rest, last = done.stderr.rstrip("\n").split("\n")
    assert last.startswith("elapsed: "), done.stderr
    done.stderr = "\n".join(rest) + "\n"
    return done, float(last.removeprefix("elapsed: "))


def linear(*models: str | Path, extra: str = "") -> str:
    body = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return f"merge_method: linear\nmodels:\n{body}{extra}"


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_one_clean_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, exactly one error line holding every word, a hint, no traceback, no line twice."""
    assert result.returncode == 2, result.stderr
    (line,) = errors(result)
    for word in words:
        assert word in line, (word, result.stderr)
    assert "  hint: " in result.stderr and "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == len(set(lines)), result.stderr
    return line


@pytest.fixture
def hub_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """huggingface_hub's settings for this process, as the HF_* variables would set them: an
    empty cache, online. (In-process runs skip a process start; downloads are tested through
    the CLI, where the variables themselves are used.)"""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    return constants


def prepare_error(recipe: str) -> tuple[MergeError, float]:
    """The one problem `prepare` finds, and how long finding it took."""
    start = time.monotonic()
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    seconds = time.monotonic() - start
    found = info.value.errors if isinstance(info.value, MergeErrors) else [info.value]
    assert len(found) == 1, [e.message for e in found]
    return found[0], seconds


def test_an_unreachable_hub_is_one_error_at_once_through_the_cli(
    family: Family, tmp_path: Path
) -> None:
    """The issue's case: no network at all (the hub's name does not resolve)."""
    base, _ = family
    recipe = write_recipe(tmp_path, linear("acme/tiny-model", base))
    result, seconds = run_hub_cli(
        tmp_path / "home", "validate", recipe, HF_ENDPOINT="http://hub.invalid"
    )
    line = assert_one_clean_error(
        result, "'acme/tiny-model'", "cannot reach the hub at hub.invalid", "DNS lookup failed"
    )
    # The model is not blamed for the network, and no retry was logged (or waited for).
    assert "not found" not in line and "no weights" not in line
    assert "HF_HUB_OFFLINE=1" in result.stderr and "local folder" in result.stderr
    assert "Retrying" not in result.stderr and "thrown while requesting" not in result.stderr
    assert "warning" not in result.stderr
    assert seconds < AT_ONCE_S, seconds


def test_a_refused_connection_is_one_error_naming_host_and_cause(
    family: Family, hub_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = family
    host = f"127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hub_settings, "ENDPOINT", f"http://{host}")
    error, seconds = prepare_error(linear("acme/tiny-model", base))
    assert "model 'acme/tiny-model': cannot reach the hub at " + host in error.message
    assert "connection refused" in error.message
    assert error.hint and "HF_HUB_OFFLINE=1" in error.hint
    assert seconds < AT_ONCE_S, seconds


def test_a_hub_that_never_answers_times_out_once(
    family: Family, hub_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = family
    silent = SilentServer()
    try:
        monkeypatch.setattr(hub_settings, "ENDPOINT", f"http://127.0.0.1:{silent.port}")
        error, seconds = prepare_error(linear("acme/tiny-model", base))
    finally:
        silent.close()
    assert f"cannot reach the hub at 127.0.0.1:{silent.port}" in error.message
    assert "no answer within 1 s" in error.message
    assert silent.connections == 1 and seconds < AT_ONCE_S, (silent.connections, seconds)


def test_a_tokenizer_source_on_an_unreachable_hub_gets_the_same_error(
    family: Family, hub_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned = family
    host = f"127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hub_settings, "ENDPOINT", f"http://{host}")
    recipe = linear(base, tuned[0], extra="tokenizer_source: acme/tiny-tok\n")
    error, seconds = prepare_error(recipe)
    assert f"tokenizer source 'acme/tiny-tok': cannot reach the hub at {host}" in error.message
    assert seconds < AT_ONCE_S, seconds


def test_offline_with_an_empty_cache_says_the_model_is_not_cached(
    family: Family, hub_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = family
    monkeypatch.setattr(hub_settings, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_settings, "ENDPOINT", "http://hub.invalid")
    error, _ = prepare_error(linear("acme/tiny-model", base))
    assert "'acme/tiny-model'" in error.message
    assert "not in the local hub cache" in error.message and "HF_HUB_OFFLINE" in error.message
    assert str(hub_settings.HF_HUB_CACHE) in error.message
    assert error.hint and "hf download acme/tiny-model" in error.hint


def test_a_hub_that_answers_no_is_told_apart_from_one_that_cannot_be_reached(
    family: Family, hub: FakeHub, tmp_path: Path
) -> None:
    base, tuned = family
    hub.add("acme/known", tuned[0])
    hub.add("acme/gated", tuned[1])
    hub.gated.add("acme/gated")
    recipe = write_recipe(
        tmp_path, linear(base, "acme/not-there", "acme/known@no-such-branch", "acme/gated")
    )
    result, seconds = run_hub_cli(tmp_path / "home", "validate", recipe, HF_ENDPOINT=hub.url)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    found = errors(result)
    host = hub.url.removeprefix("http://")
    assert any("'acme/not-there'" in e and "no model acme/not-there" in e for e in found), found
    assert any(host in e and "acme/not-there" in e for e in found), found
    assert any("no revision 'no-such-branch'" in e for e in found), found
    assert any("'acme/gated'" in e and "gated" in e for e in found), found
    assert not any("cannot reach" in e for e in found), found
    # One question about the missing model, not a retry loop.
    asked = [p for _, p in hub.requests if "not-there" in p]
    assert len(asked) == 1, asked
    assert seconds < AT_ONCE_S, seconds


def test_a_hub_model_is_fetched_merged_and_then_works_from_the_cache(
    family: Family,
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, tuned = family
    # Beside the safetensors: a pickle that must never be fetched, and an unrelated folder file.
    junk = {"pytorch_model.bin": b"not a checkpoint", "README.md": b"# tiny"}
    hub.add("acme/tiny-base", base, junk)
    hub.add("acme/tiny-tuned", tuned[0], junk)
    home = tmp_path / "home"
    recipe = write_recipe(tmp_path, linear("acme/tiny-base", "acme/tiny-tuned"))
    out = tmp_path / "hub-out"
    result, _ = run_hub_cli(home, "run", recipe, out, HF_ENDPOINT=hub.url)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    wanted = {"model.safetensors", "config.json", "generation_config.json"}
    wanted |= {"tokenizer.json", "tokenizer_config.json"}
    assert hub.fetched("acme/tiny-base") == wanted
    local = tmp_path / "local-out"
    merge(linear(base, tuned[0]), local)
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (out / "config.json").read_bytes() == (local / "config.json").read_bytes()

    # Offline: the cache answers, and the hub hears nothing.
    from huggingface_hub import constants

    before = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    plan, _ = prepare(linear("acme/tiny-base", "acme/tiny-tuned"))
    assert len(plan.jobs) == 39 and len(hub.requests) == before
    # Online but unreachable: the cached copy is used, and the user is told why, once a model.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        plan, _ = prepare(linear("acme/tiny-base", "acme/tiny-tuned"))
    assert len(plan.jobs) == 39
    notes = [r.getMessage() for r in caplog.records if "local cache" in r.getMessage()]
    assert len(notes) == 2, notes
    assert all("cannot be reached" in n and "connection refused" in n for n in notes), notes
    # A commit given by its hash never changes: once cached, the hub is not asked at all.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        plan, _ = prepare(linear(f"acme/tiny-base@{COMMIT}", f"acme/tiny-tuned@{COMMIT}"))
    assert len(plan.jobs) == 39 and not caplog.records
