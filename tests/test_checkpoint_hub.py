"""The Hub code path, offline: a local HTTP server speaks the Hub's resolve protocol to the real huggingface_hub
client (HF_ENDPOINT), then HF_HUB_OFFLINE=1 reads the same files from the HF cache. Each load runs in a fresh
interpreter so the environment variables are read as users set them."""

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


class _HubHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    requested: list

    def _serve(self, with_body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        path = None
        if len(parts) >= 5 and parts[2] == "resolve":
            path = self.root / "/".join(parts[4:])
            self.requested.append("/".join(parts[4:]))
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
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
s = load_kv_scales("org/model-FP8-KV", revision="main")
print(json.dumps({"k": [t.tolist() for t in s.key], "v": [t.tolist() for t in s.value], "strategy": s.strategy}))
"""


def _load(env_extra: dict, hf_home: Path) -> dict:
    import os

    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1", **env_extra}
    if "HF_HUB_OFFLINE" not in env_extra:
        env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hub_download_fetches_only_configs_index_and_scale_shards_then_works_offline(hub):
    endpoint, requested, k, v, hf_home = hub
    online = _load({"HF_ENDPOINT": endpoint}, hf_home)
    assert online["strategy"] == "attn_head"
    assert online["k"] == [t.float().tolist() for t in k] and online["v"] == [t.float().tolist() for t in v]
    fetched = set(requested)
    assert {"config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"} <= fetched
    assert "model-00001-of-00002.safetensors" not in fetched  # the weights shard
    assert not any(name.endswith((".bin", ".pt", ".py")) for name in fetched)  # no pickles, no remote code
    requested.clear()
    offline = _load({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}, hf_home)
    assert offline == online and requested == []
