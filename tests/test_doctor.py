"""``cogportrait doctor``: the real installation's report, the LLM probe against a real loopback
server (reachable, answering an error, a closed port) and the exit code when a required part fails."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Any

import pytest
import yaml

from cogportrait.face import model_files
from pipelines import doctor
from pipelines.cli import main
from pipelines.doctor import Check, exit_code, format_table, run_checks

from conftest import REPO
from llm_server import LoopbackLLM
from media import build_tiny_arcface

KEYS = {"name", "required", "ok", "detail", "enables"}
CLEAN_ENV = ("OPENAI_BASE_URL", "OPENAI_API_KEY")


class LoopbackWithModels(LoopbackLLM):
    """The tests' OpenAI-compatible server, also answering ``GET /v1/models`` as real ones do."""

    def _handler_class(self):
        base = super()._handler_class()

        class Handler(base):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        return Handler


def _params(tmp_path, base_url: str = "", arcface_dir: str = "") -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"compile": {"openai": {"base_url": base_url, "model": "test-model"}},
                                    "evaluate_videos": {"arcface_dir": arcface_dir}}))
    return str(path)


def _doctor_json(capsys, params: str) -> tuple[int, dict[str, dict[str, Any]]]:
    code = main(["--params", params, "doctor", "--json"])
    checks = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in checks}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_real_cli_reports_this_installation():
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "cogportrait"), "doctor", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)  # stdout is exactly one JSON list
    assert isinstance(checks, list) and all(set(c) == KEYS for c in checks)
    by_name = {c["name"]: c for c in checks}
    assert len(by_name) == len(checks)  # names are unique
    expected = {"python 3.11", "model files", "ffmpeg libx264 (PyAV)", "gpu (torch cuda)", "faiss gpu", "identity: arcface",
                "identity: dlib", "llm endpoint", "chromium", "onnxruntime cuda",
                *(f"import {p}" for p in doctor.CORE_PACKAGES),
                *(f"weights {folder}" for _, folder in doctor.weight_folders())}
    assert set(by_name) == expected
    assert "weights models/Wan2.2-TI2V-5B-Diffusers/transformer" in by_name  # the Stage-2 folders of the wan2.2 configs
    required = [c for c in checks if c["required"]]
    assert {c["name"] for c in required} == {"python 3.11", "model files", "ffmpeg libx264 (PyAV)",
                                              *(f"import {p}" for p in doctor.CORE_PACKAGES)}
    assert all(c["ok"] for c in required), [c for c in required if not c["ok"]]
    assert by_name["import torch"]["detail"].startswith("2.")  # versions are reported
    assert "decoded 5" in by_name["ffmpeg libx264 (PyAV)"]["detail"]
    gpu = by_name["gpu (torch cuda)"]  # this machine has no GPU
    assert gpu["ok"] is False and "not available" in gpu["detail"] and gpu["required"] is False
    assert by_name["llm endpoint"]["ok"] is True  # nothing configured: the offline default
    assert by_name["llm endpoint"]["detail"].startswith("offline rules backend (default)")
    tiny_vae = by_name["weights training/weights/tiny_vae"]  # shipped with the repo
    assert tiny_vae["ok"] and "config.json present" in tiny_vae["detail"]
    assert elapsed < 30  # < 10 s on an idle machine; the bound leaves room for a busy one


def test_table_lists_every_check_and_the_summary(clean_env, capsys):
    assert main(["--params", str(REPO / "params.yaml"), "doctor"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL", "ENABLES"]
    for name in ("python 3.11", "model files", "gpu (torch cuda)", "llm endpoint", "import faiss"):
        assert any(line.split("  ")[0] in ("ok", "-", "MISSING") and name in line for line in lines), name
    assert lines[-1].startswith("required: ") and "/" in lines[-1] and "optional: " in lines[-1]
    assert "MISSING" not in out


def test_llm_endpoint_reachable(clean_env, tmp_path, capsys):
    with LoopbackWithModels() as server:
        code, checks = _doctor_json(capsys, _params(tmp_path, server.base_url))
    llm = checks["llm endpoint"]
    assert code == 0
    assert llm["ok"] is True and "reachable (HTTP 200, 1 model(s))" in llm["detail"], llm
    assert f"{server.base_url}/models" in llm["detail"]


def test_llm_endpoint_sends_the_key_from_the_environment(clean_env, monkeypatch, tmp_path):
    seen: list[str | None] = []

    class Recording(LoopbackWithModels):
        def _handler_class(self):
            base = super()._handler_class()

            class Handler(base):
                def do_GET(self) -> None:  # noqa: N802
                    seen.append(self.headers.get("Authorization"))
                    super().do_GET()

            return Handler

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with Recording() as server:
        check = doctor.check_llm_endpoint(_params(tmp_path, server.base_url))
    assert check.ok and seen == ["Bearer sk-test"]


def test_llm_endpoint_answering_an_error_is_reported(clean_env, tmp_path):
    with LoopbackLLM() as server:  # the chat-only server: GET is not supported (HTTP 501)
        check = doctor.check_llm_endpoint(_params(tmp_path, server.base_url))
    assert check.ok is False and "reachable but answered HTTP 501" in check.detail


def test_llm_endpoint_unreachable_is_optional(clean_env, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    t0 = time.perf_counter()
    code, checks = _doctor_json(capsys, _params(tmp_path, url))
    assert time.perf_counter() - t0 < 30
    llm = checks["llm endpoint"]
    assert llm["ok"] is False and llm["required"] is False
    assert "unreachable" in llm["detail"] and "refused" in llm["detail"].lower(), llm
    assert code == 0  # an optional part: the installation is still fine


def test_llm_endpoint_from_the_environment(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1/")
    check = doctor.check_llm_endpoint(_params(tmp_path, ""))
    assert not check.ok and "/v1/models" in check.detail and "//models" not in check.detail


def test_missing_params_file_is_a_user_error(capsys):
    assert main(["--params", "/nonexistent/params.yaml", "doctor"]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_missing_required_part_exits_1(clean_env, monkeypatch, capsys):
    # the bundled detector no longer matches: the check `cogportrait models check` runs now fails
    monkeypatch.setattr(model_files, "FACE_DETECTOR_SHA256", "0" * 64)
    model_files._sha256.cache_clear()
    checks = run_checks(REPO / "params.yaml")
    model = next(c for c in checks if c.name == "model files")
    assert model.ok is False and model.detail.startswith("ModelFileError: ") and "expected " + "0" * 64 in model.detail
    assert exit_code(checks) == 1
    table = format_table(checks)
    assert "MISSING  model files" in table and "(missing: model files)" in table
    assert main(["--params", str(REPO / "params.yaml"), "doctor"]) == 1
    capsys.readouterr()


def test_a_check_that_raises_is_a_failed_check():
    def probe() -> tuple[bool, str]:
        import no_such_module_for_doctor  # noqa: F401

        return True, "unreachable"

    check = doctor._checked("import no_such_module_for_doctor", True, "nothing", probe)
    assert check == Check("import no_such_module_for_doctor", True, False,
                          "ModuleNotFoundError: No module named 'no_such_module_for_doctor'", "nothing")
    assert exit_code([check]) == 1 and exit_code([Check("x", False, False, "", "")]) == 0


def test_arcface_backend_as_evaluate_videos_loads_it(tmp_path):
    pack = build_tiny_arcface(tmp_path / "buffalo_tiny")
    check = doctor.check_arcface(_params(tmp_path, arcface_dir=str(pack)))
    assert check.ok and "w600k_r50.onnx" in check.detail and "identity_backend: arcface" in check.detail, check
    (tmp_path / "empty").mkdir()
    check = doctor.check_arcface(_params(tmp_path, arcface_dir=str(tmp_path / "empty")))
    assert not check.ok and "no recognition model" in check.detail
    check = doctor.check_arcface(_params(tmp_path, arcface_dir=str(tmp_path / "nowhere")))
    assert not check.ok and "not found" in check.detail
    check = doctor.check_arcface(_params(tmp_path))
    assert not check.ok and "no evaluate_videos.arcface_dir" in check.detail and not check.required


def test_weights_folder_needs_its_config_json(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "local.yaml").write_text(yaml.safe_dump({"model": {
        "source": "local", "transformer": "w/transformer", "vae": "w/vae", "text_encoder": "w/te",
        "tokenizer": "w/tok", "audio_encoder": "w/audio"}}))
    monkeypatch.chdir(tmp_path)  # relative folders resolve against the working directory, as in `train`
    (tmp_path / "w" / "transformer").mkdir(parents=True)
    (tmp_path / "w" / "transformer" / "config.json").write_text("{}")
    (tmp_path / "w" / "vae").mkdir()  # a folder without config.json is not a model
    (tmp_path / "w" / "tok").mkdir()
    (tmp_path / "w" / "tok" / "tokenizer_config.json").write_text("{}")
    checks = {c.name: c for c in doctor.check_weights(configs)}
    assert {n: c.ok for n, c in checks.items()} == {
        "weights w/transformer": True, "weights w/vae": False, "weights w/te": False, "weights w/tok": True,
        "weights w/audio": False}
    assert "no config.json" in checks["weights w/vae"].detail and "no such folder" in checks["weights w/te"].detail
    assert all(c.enables == "Stage 2: local" and not c.required for c in checks.values())
