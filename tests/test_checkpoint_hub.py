"""The Hub code path, offline: a local HTTP server speaks the Hub's resolve protocol to the real huggingface_hub
client (HF_ENDPOINT), then HF_HUB_OFFLINE=1 reads the same files from the HF cache. Each load runs in a fresh
interpreter so the environment variables are read as users set them. The server holds one repository,
org/model-FP8-KV, at revision main: other repositories and revisions get the Hub's 404s for them (org/gated the
Hub's answer to a gated repository without access)."""

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import write_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/model-FP8-KV"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    requested: list

    def _serve(self, with_body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        path, error = None, "EntryNotFound"
        if len(parts) >= 5 and parts[2] == "resolve":
            path = self.root / "/".join(parts[4:])
            self.requested.append("/".join(parts[4:]))
            if "/".join(parts[:2]) != REPO:
                path, error = None, "GatedRepo" if parts[:2] == ["org", "gated"] else "RepoNotFound"
            elif parts[3] not in ("main", COMMIT):
                path, error = None, "RevisionNotFound"
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802
        self._serve(False)

    def do_GET(self):  # noqa: N802
        self._serve(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    repo = tmp_path / "repo"
    k, v = write_checkpoint(repo, shards=2, strategy="attn_head")
    (repo / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)  # stands for the weights: never fetched
    handler = type("Handler", (_HubHandler,), {"root": repo, "requested": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requested, k, v, tmp_path / "hf_home"
    server.shutdown()


_LOAD = """
import json, sys
from hf_fp8cache import load_kv_scales
for repo, revision in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        s = load_kv_scales(repo, revision=revision)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e), "cause": type(e.__cause__).__name__}))
    else:
        print(json.dumps({"k": [t.tolist() for t in s.key], "v": [t.tolist() for t in s.value],
                          "strategy": s.strategy}))
"""
_DOWNLOAD_CONFIG = f"from huggingface_hub import hf_hub_download; hf_hub_download({REPO!r}, 'config.json')"


def _run(code: str, env_extra: dict, hf_home: Path, *argv: str) -> list[dict]:
    import os

    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **env_extra}
    if "HF_HUB_OFFLINE" not in env_extra:
        env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _load(env_extra: dict, hf_home: Path, *repos_and_revisions: str) -> list[dict]:
    """What load_kv_scales gives (or raises) for each repo and revision, in one fresh interpreter."""
    return _run(_LOAD, env_extra, hf_home, *(repos_and_revisions or (REPO, "main")))


def test_hub_download_fetches_only_configs_index_and_scale_shards_then_works_offline(hub):
    endpoint, requested, k, v, hf_home = hub
    [online] = _load({"HF_ENDPOINT": endpoint}, hf_home)
    assert online["strategy"] == "attn_head"
    assert online["k"] == [t.float().tolist() for t in k] and online["v"] == [t.float().tolist() for t in v]
    fetched = set(requested)
    assert {"config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"} <= fetched
    assert "model-00001-of-00002.safetensors" not in fetched  # the weights shard
    assert not any(name.endswith((".bin", ".pt", ".py")) for name in fetched)  # no pickles, no remote code
    requested.clear()
    [offline] = _load({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}, hf_home)
    assert offline == online and requested == []


def test_offline_without_a_cached_copy_says_so(hub):
    endpoint, requested, _, _, hf_home = hub
    [failed] = _load({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"}, hf_home)
    assert failed == {
        "error": "FileNotFoundError",
        "message": f"{REPO} (revision 'main'): config.json is not in the local Hugging Face cache ({hf_home / 'hub'}) "
        "and offline mode (HF_HUB_OFFLINE=1 or local_files_only=True) forbids downloading; download the checkpoint "
        "once online (it is then cached), or pass a local directory",
        "cause": "LocalEntryNotFoundError",
    }
    assert requested == []
    _run(_DOWNLOAD_CONFIG, {"HF_ENDPOINT": endpoint}, hf_home)  # only the config cached: the scales are not
    [failed] = _load({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"}, hf_home)
    assert failed["error"] == "FileNotFoundError" and failed["message"].startswith(
        f"{REPO} (revision 'main'): model.safetensors.index.json, model.safetensors, kv_scales.safetensors are not "
        "in the local Hugging Face cache"
    )


def test_unknown_repository_revision_or_shard_is_named(hub, tmp_path):
    endpoint, _, _, _, hf_home = hub
    (tmp_path / "repo" / "model-00002-of-00002.safetensors").unlink()  # the shard the index says holds the scales
    repo, gated, revision, shard = _load({"HF_ENDPOINT": endpoint}, hf_home, "org/model-FP8-KVV", "main",
                                         "org/gated", "main", REPO, "v2", REPO, "main")  # fmt: skip
    assert repo == {
        "error": "FileNotFoundError",
        "message": f"org/model-FP8-KVV: no such local directory, and no such repository on the Hub ({endpoint}); "
        "check the id, and for a private repository log in (`hf auth login`) or pass token=",
        "cause": "RepositoryNotFoundError",
    }
    assert gated == {
        "error": "PermissionError",
        "message": f"org/gated: the Hub repository is gated; accept its conditions at {endpoint}/org/gated and log "
        "in (`hf auth login`) or pass token=",
        "cause": "GatedRepoError",
    }
    assert revision == {
        "error": "FileNotFoundError",
        "message": f"{REPO}: the Hub repository has no revision 'v2'; pass an existing branch, tag or commit",
        "cause": "RevisionNotFoundError",
    }
    assert shard == {
        "error": "FileNotFoundError",
        "message": f"{REPO} (revision 'main'): model-00002-of-00002.safetensors is listed in "
        "model.safetensors.index.json but the Hub repository has no such file",
        "cause": "RemoteEntryNotFoundError",
    }
