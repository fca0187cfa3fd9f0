"""``cogportrait doctor``: which parts of this installation are present, and what each enables.

The project runs end to end on CPU with the pinned wheels and the bundled model files (the
*required* parts); GPUs, the Stage-2 weights, an LLM endpoint, identity backends and a browser
each unlock more (the *optional* parts). A user who wonders why a verb is slow, falls back to the
rules planner or writes ``identity_sim = null`` asks this command, not the traceback.

Every check is a small function returning a ``Check``; a check never raises (a failing import or
probe is a failed check with the error in ``detail``) and is fast (the whole report takes a few
seconds on CPU: mostly importing torch and diffusers). ``exit_code``: 0 when every required part
is present, 1 otherwise; 2 stays the CLI's code for user errors.

The only network access is the LLM probe, and only to the endpoint the user configured.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_REQUIRED_MISSING = 1

CORE_PACKAGES = ("ray", "pyarrow", "faiss", "mediapipe", "av", "torch", "diffusers", "transformers", "dvc")
DISTRIBUTIONS = {"faiss": "faiss-cpu"}  # import name -> the pinned distribution, where they differ
PACKAGE_USES = {
    "ray": "the Ray Data jobs and Ray Train",
    "pyarrow": "every Parquet table",
    "faiss": "the prototype library's index",
    "mediapipe": "MediaPipe face detection and landmarks",
    "av": "video decoding and encoding",
    "torch": "Stage 2 (train, sample, generate)",
    "diffusers": "the Wan backbone and VAE of Stage 2",
    "transformers": "the UMT5 text and wav2vec2 audio encoders of Stage 2",
    "dvc": "`dvc repro`, the pipeline",
}
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package
TRAINING_CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
LLM_TIMEOUT_S = 2.0
DETAIL_CHARS = 72  # of a detail in the table; --json has it whole


@dataclass(frozen=True)
class Check:
    """One finding: ``ok`` says whether the part is present and working, ``detail`` what was seen
    (a version, a path, an error), ``enables`` what the part is for."""

    name: str
    required: bool
    ok: bool
    detail: str
    enables: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Probe = Callable[[], tuple[bool, str]]


def _error_text(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _checked(name: str, required: bool, enables: str, probe: Probe) -> Check:
    """Run ``probe`` so that nothing escapes: whatever it raises is the check's finding."""
    try:
        ok, detail = probe()
    except Exception as err:  # noqa: BLE001 - a check reports, never raises; the error is the detail
        ok, detail = False, _error_text(err)
    return Check(name, required, ok, detail, enables)


def _version(module: Any, name: str) -> str:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


# ------------------------------------------------------------------------------------------------
# required
# ------------------------------------------------------------------------------------------------
def check_python() -> Check:
    def probe() -> tuple[bool, str]:
        version = ".".join(map(str, sys.version_info[:3]))
        return sys.version_info[:2] == (3, 11), f"{version} ({sys.executable})"

    return _checked("python 3.11", True, "everything (the pinned wheels are for 3.11)", probe)


def check_model_files() -> Check:
    """The same files, by the same functions, as ``cogportrait models check``."""

    def probe() -> tuple[bool, str]:
        from cogportrait.face.model_files import face_detector_path, face_landmarker_path

        return True, f"{face_detector_path().name}, {face_landmarker_path().name}: sha256 ok"

    return _checked("model files", True, "face detection and landmarks (curate, extract)", probe)


def check_package(name: str) -> Check:
    def probe() -> tuple[bool, str]:
        return True, _version(importlib.import_module(name), name)

    return _checked(f"import {name}", True, PACKAGE_USES.get(name, ""), probe)


def check_ffmpeg() -> Check:
    """Encode a few libx264 frames into memory and decode them back: PyAV's own FFmpeg libraries
    (not a system ffmpeg) are what curate and sample write videos with."""

    def probe() -> tuple[bool, str]:
        import av
        import numpy as np

        n = 5
        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for i in range(n):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * i, np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        buf.seek(0)
        with av.open(buf) as src:
            decoded = sum(1 for _ in src.decode(video=0))
        ffmpeg = getattr(av, "ffmpeg_version_info", "?")
        ok = decoded == n
        return ok, f"FFmpeg {ffmpeg}: libx264 encoded {n} frames ({len(buf.getvalue())} B), decoded {decoded}"

    return _checked("ffmpeg libx264 (PyAV)", True, "writing clips and videos", probe)


# ------------------------------------------------------------------------------------------------
# optional
# ------------------------------------------------------------------------------------------------
def check_gpu() -> Check:
    def probe() -> tuple[bool, str]:
        import torch

        if not torch.cuda.is_available():
            return False, f"not available (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
        props = torch.cuda.get_device_properties(0)
        return True, (f"{torch.cuda.device_count()} device(s); 0: {props.name}, {props.total_memory / 2**30:.1f} GiB "
                      f"(CUDA {torch.version.cuda})")

    return _checked("gpu (torch cuda)", False, "Stage 2 at scale (wan2.2 configs: use_gpu, bf16)", probe)


def check_faiss_gpu() -> Check:
    def probe() -> tuple[bool, str]:
        import faiss

        if not hasattr(faiss, "get_num_gpus") or not hasattr(faiss, "StandardGpuResources"):
            return False, f"CPU build (faiss {_version(faiss, 'faiss')})"
        n = faiss.get_num_gpus()
        return n > 0, f"GPU build, {n} GPU(s) visible"

    return _checked("faiss gpu", False, "FAISS on GPU (the library index runs on CPU)", probe)


def _section(params_path: str | Path, name: str) -> Any:
    """The ``name`` section of the params file as its config object (defaults when the file or the
    section is absent), as the verb that uses it would read it."""
    from cogportrait.config import STAGE_CONFIGS, from_mapping, load_params

    path = Path(params_path)
    params = load_params(path) if path.is_file() else {}
    return from_mapping(STAGE_CONFIGS[name], params.get(name), name)


def check_arcface(params_path: str | Path) -> Check:
    """ID-Sim's ArcFace backend as ``evaluate videos`` loads it: the recognition ONNX of the local
    insightface pack named by ``evaluate_videos.arcface_dir``, run by onnxruntime (the insightface
    package itself is not needed, and is reported only for information)."""

    def probe() -> tuple[bool, str]:
        from cogportrait.metrics.identity import make_identity_backend

        cfg = _section(params_path, "evaluate_videos")
        selected = f"identity_backend: {cfg.identity_backend}"
        if not cfg.arcface_dir:
            return False, "no evaluate_videos.arcface_dir (an insightface pack, e.g. buffalo_l)"
        backend, why = make_identity_backend("arcface", cfg.arcface_dir)
        if backend is None:
            return False, why
        try:
            package = f"insightface {_version(importlib.import_module('insightface'), 'insightface')}"
        except ImportError:
            package = "insightface package not installed (not needed)"
        return True, f"{cfg.arcface_dir}: {backend.model_file}; {selected}; {package}"

    return _checked("identity: arcface", False, "ID-Sim in `evaluate videos` (the paper's ArcFace metric)", probe)


def check_dlib(params_path: str | Path) -> Check:
    def probe() -> tuple[bool, str]:
        from cogportrait.metrics.identity import make_identity_backend

        backend, why = make_identity_backend("dlib", "")
        if backend is None:
            return False, why
        versions = ", ".join(f"{n} {_version(importlib.import_module(n), n)}" for n in ("dlib", "face_recognition_models"))
        return True, f"{versions}; identity_backend: {_section(params_path, 'evaluate_videos').identity_backend}"

    return _checked("identity: dlib", False, "ID-Sim (dlib) in `evaluate videos` (not ArcFace's numbers)", probe)


def llm_base_url(params_path: str | Path, environ: Mapping[str, str] = os.environ) -> tuple[str, dict[str, str]]:
    """The endpoint ``compile --backend openai`` would use and the headers to send (the key, if set)."""
    from cogportrait.agents.llm import openai_api_key, openai_base_url

    cfg = _section(params_path, "compile").openai
    key = openai_api_key(cfg, environ)
    return openai_base_url(cfg, environ=environ), ({"Authorization": f"Bearer {key}"} if key else {})


def check_llm_endpoint(params_path: str | Path, environ: Mapping[str, str] = os.environ) -> Check:
    def probe() -> tuple[bool, str]:
        url, headers = llm_base_url(params_path, environ)
        if not url:
            return True, "offline rules backend (default): no compile.openai.base_url or OPENAI_BASE_URL"
        target = f"{url}/models"
        if not target.startswith(("http://", "https://")):
            return False, f"base URL {url!r} is not http(s)"
        request = urllib.request.Request(target, headers={"Accept": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=LLM_TIMEOUT_S) as response:  # noqa: S310 - http(s) only, checked above
                status, body = response.status, response.read(1 << 20)
        except urllib.error.HTTPError as err:
            hint = " (is the key in the variable named by compile.openai.api_key_env?)" if err.code in (401, 403) else ""
            return False, f"GET {target}: reachable but answered HTTP {err.code} {err.reason}{hint}"
        except urllib.error.URLError as err:
            return False, f"GET {target}: unreachable ({_error_text(err.reason) if isinstance(err.reason, BaseException) else err.reason})"
        except (TimeoutError, OSError) as err:
            return False, f"GET {target}: unreachable ({_error_text(err)})"
        return True, f"GET {target}: reachable (HTTP {status}{_model_count(body)})"

    return _checked("llm endpoint", False, "compile --backend openai (LLM planner)", probe)


def _model_count(body: bytes) -> str:
    import json

    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return ", not an OpenAI model list"
    return f", {len(data)} model(s)" if isinstance(data, list) else ", not an OpenAI model list"


def weight_folders(configs_dir: str | Path = TRAINING_CONFIGS) -> dict[tuple[str, str], list[str]]:
    """(component, folder) -> the training configs naming it, for every local folder in
    ``training/configs/*.yaml`` (``base`` files merged, as ``cogportrait train`` reads them)."""
    from training.config import MODEL_FOLDERS, load_stage2_config

    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(Path(configs_dir).glob("*.yaml")):
        model = load_stage2_config(path).model
        for component in MODEL_FOLDERS:
            folder = getattr(model, component)
            if folder:
                found.setdefault((component, folder), []).append(path.name)
    return found


def _folder_probe(component: str, folder: str) -> Probe:
    # save_pretrained writes config.json; a tokenizer folder has tokenizer_config.json instead
    marker = "tokenizer_config.json" if component == "tokenizer" else "config.json"

    def probe() -> tuple[bool, str]:
        path = Path(folder)
        if not path.is_dir():
            return False, f"{component}: no such folder (under {Path.cwd()})" if not path.is_absolute() else f"{component}: no such folder"
        if not (path / marker).is_file():
            return False, f"{component}: the folder has no {marker}"
        return True, f"{component}: {marker} present"

    return probe


def check_weights(configs_dir: str | Path = TRAINING_CONFIGS) -> list[Check]:
    """One check per local weights folder the training configs name (relative paths against the
    working directory, as ``cogportrait train`` resolves them)."""
    try:
        folders = weight_folders(configs_dir)
    except Exception as err:  # noqa: BLE001 - a check reports, never raises
        return [Check("weights", False, False, f"reading {configs_dir}: {_error_text(err)}", "Stage 2 with local weights")]
    return [_checked(f"weights {folder}", False, f"Stage 2: {', '.join(Path(c).stem for c in configs)}", _folder_probe(component, folder))
            for (component, folder), configs in folders.items()]


def check_chromium() -> Check:
    def probe() -> tuple[bool, str]:
        if not CHROMIUM.is_file():
            return False, f"no {CHROMIUM} (apt-get install chromium)"
        executable = os.access(CHROMIUM, os.X_OK)
        return executable, str(CHROMIUM) if executable else f"{CHROMIUM} is not executable"

    return _checked("chromium", False, "the library report's browser test", probe)


def check_onnxruntime_cuda() -> Check:
    def probe() -> tuple[bool, str]:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        return "CUDAExecutionProvider" in providers, f"onnxruntime {onnxruntime.__version__}: {', '.join(providers)}"

    return _checked("onnxruntime cuda", False, "GPU OCR in curate's text filter", probe)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def run_checks(params_path: str | Path = "params.yaml") -> list[Check]:
    """Every check, required ones first; never raises."""
    return [
        check_python(),
        check_model_files(),
        *(check_package(name) for name in CORE_PACKAGES),
        check_ffmpeg(),
        check_gpu(),
        check_faiss_gpu(),
        check_arcface(params_path),
        check_dlib(params_path),
        check_llm_endpoint(params_path),
        *check_weights(),
        check_chromium(),
        check_onnxruntime_cuda(),
    ]


def exit_code(checks: list[Check]) -> int:
    """0 when every required part is present, 1 otherwise (optional parts never fail the command)."""
    return EXIT_OK if all(c.ok for c in checks if c.required) else EXIT_REQUIRED_MISSING


def _status(check: Check) -> str:
    if check.ok:
        return "ok"
    return "MISSING" if check.required else "-"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def format_table(checks: list[Check]) -> str:
    """A fixed-width table (status, check, detail, enables), required parts first, and a summary.
    Status: ``ok``, ``MISSING`` (a required part: exit 1) or ``-`` (an optional part not present)."""
    required = [c for c in checks if c.required]
    optional = [c for c in checks if not c.required]
    header = ("STATUS", "CHECK", "DETAIL", "ENABLES")
    rows = [(_status(c), c.name, _clip(c.detail, DETAIL_CHARS), c.enables) for c in checks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths)), row[3]]).rstrip()

    lines = [line(header)]
    for title, group in (("required", required), ("optional", optional)):
        lines.append(f"-- {title} --")
        lines += [line(rows[checks.index(c)]) for c in group]
    missing = [c.name for c in required if not c.ok]
    lines.append("")
    lines.append(f"required: {sum(c.ok for c in required)}/{len(required)} ok"
                 + (f" (missing: {', '.join(missing)})" if missing else "")
                 + f"; optional: {sum(c.ok for c in optional)}/{len(optional)} present")
    return "\n".join(lines)
