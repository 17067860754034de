"""push-to-server against a local HTTP server on 127.0.0.1 that speaks vLLM's and SGLang's load / unload endpoints."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from factories import one_line_error, peft_adapter_from_model, run_cli, tiny_llama

SERVED = "org/tiny-llama"


class EngineServer:
    """The runtime-LoRA API of a serving engine: vLLM (/v1/...) or SGLang (no prefix); it reads the folder it is
    given the way the engines do (adapter_config.json with peft_type LORA, a weights file)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.loaded: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._reply(200, {"data": [{"id": SERVED, "parent": None}] + [
                        {"id": name, "parent": SERVED} for name in outer.loaded]})
                else:
                    self._reply(404, {"message": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                name = body.get("lora_name")
                if self.path == f"{outer.prefix}/load_lora_adapter":
                    if name in outer.loaded:
                        return self._reply(400, {"message": f"The lora adapter '{name}' has already been loaded."})
                    folder = Path(body["lora_path"])
                    config = json.loads((folder / "adapter_config.json").read_text())
                    if config["peft_type"] != "LORA" or not (folder / "adapter_model.safetensors").is_file():
                        return self._reply(400, {"message": "not a LoRA adapter"})
                    outer.loaded[name] = str(folder)
                    return self._reply(200, {"message": f"Success: LoRA adapter '{name}' added successfully."})
                if self.path == f"{outer.prefix}/unload_lora_adapter":
                    if name not in outer.loaded:
                        return self._reply(404, {"message": f"The lora adapter '{name}' cannot be found."})
                    del outer.loaded[name]
                    return self._reply(200, {"message": "unloaded"})
                return self._reply(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture(params=["vllm", "sglang"])
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, EngineServer]]:
    server = EngineServer("/v1" if request.param == "vllm" else "")
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield request.param, server
    server.server.shutdown()
    server.server.server_close()


def test_push_loads_and_unloads_by_immutable_name(tmp_path: Path, engine: tuple[str, EngineServer]) -> None:
    kind, server = engine
    run_cli("install", str(peft_adapter_from_model(tiny_llama(), tmp_path / "a")), "--name", "sql-chat",
            "--version", "1.2.0")
    run_cli("tag", "sql-chat==1.2.0", "stable")
    shared = tmp_path / "shared"
    out = run_cli("push-to-server", server.url, "sql-chat@stable", "--engine", kind, "--dir", str(shared)).output
    assert out.startswith("loaded sql-chat@1.2.0 from ")
    assert server.loaded == {"sql-chat@1.2.0": str(shared.absolute() / "sql-chat@1.2.0")}
    config = json.loads((shared / "sql-chat@1.2.0" / "adapter_config.json").read_text())
    # vLLM: the served model's name, asked from /v1/models; SGLang: the declared base, unchanged
    assert config["base_model_name_or_path"] == (SERVED if kind == "vllm" else "tiny-llama")
    again = run_cli("push-to-server", server.url, "sql-chat==1.2.0", "--engine", kind, "--dir", str(shared)).output
    assert again.startswith("already loaded sql-chat@1.2.0")
    run_cli("push-to-server", server.url, "sql-chat==1.2.0", "--engine", kind, "--unload")
    assert server.loaded == {}
    message = one_line_error("push-to-server", server.url, "sql-chat==1.2.0", "--engine", kind, "--unload")
    assert "HTTP 404" in message and "cannot be found" in message


def test_push_refusals_are_one_line(tmp_path: Path) -> None:
    run_cli("install", str(peft_adapter_from_model(tiny_llama(), tmp_path / "d", use_dora=True)), "--name", "dora")
    server = EngineServer("/v1")
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        message = one_line_error("push-to-server", server.url, "dora", "--dir", str(tmp_path / "shared"))
        assert "DoRA" in message and server.requests == []
    finally:
        server.server.shutdown()
        server.server.server_close()
    assert "cannot reach" in one_line_error("push-to-server", server.url, "dora", "--unload")
