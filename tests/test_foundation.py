"""House rules that keep the project coherent: Ray-free core, one schema module, loadable configs."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import yaml

import cogportrait
from cogportrait import schema
from cogportrait.config import STAGE_CONFIGS, from_mapping, load_params

REPO = Path(__file__).resolve().parents[1]


def test_core_package_never_imports_ray():
    """Static check of every module, then a real import of all of them in a clean interpreter."""
    offenders = []
    for path in (REPO / "cogportrait").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders
    modules = [m.name for m in pkgutil.walk_packages(cogportrait.__path__, "cogportrait.") if not m.name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_every_params_section_loads_into_its_config():
    params = load_params(REPO / "params.yaml")
    for section, cls in STAGE_CONFIGS.items():
        assert section in params, f"params.yaml lacks section {section}"
        from_mapping(cls, params[section], section)


def test_every_shipped_yaml_config_parses():
    for path in list(REPO.glob("*.yaml")) + list((REPO / "training" / "configs").glob("*.yaml")):
        assert yaml.safe_load(path.read_text()) is not None, path


def test_dvc_stages_reference_params_sections():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    for name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            key = entry if isinstance(entry, str) else next(iter(entry))
            assert key.split(".")[0] in params, (name, key)


def test_schema_vocabulary():
    assert len(schema.CONTROL_CHANNELS) == 17 and schema.CONTROL_CHANNELS[14:] == ("yaw", "pitch", "roll")
    assert len(schema.KEYPOINT_INDICES) == 62 and schema.KEYPOINT_INDICES[:2] == (263, 249)
    assert schema.keypoint_slice("left_iris") == slice(52, 57)
    for name, table_schema in schema.TABLE_SCHEMAS.items():
        assert isinstance(table_schema, pa.Schema), name


def test_arrow_schemas_are_declared_only_in_schema_module():
    offenders = []
    for pkg in ("cogportrait", "pipelines", "prototype_store", "training", "bench"):
        for path in (REPO / pkg).rglob("*.py"):
            if path.name != "schema.py" and "pa.schema(" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_model_files_are_verified():
    from cogportrait.face.models import face_detector_path, face_landmarker_path

    assert face_detector_path().stat().st_size > 100_000
    assert face_landmarker_path().suffix == ".task"
