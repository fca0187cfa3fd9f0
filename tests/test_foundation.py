"""House rules that keep the project coherent: Ray-free core, one schema module, loadable configs."""

from __future__ import annotations

import ast
import dataclasses
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


# Layers, lowest first: a module may import its own layer and the ones below, never one above.
LAYERS = {"cogportrait": 0, "prototype_store": 1, "training": 1, "pipelines": 2}
RAY_FREE = ("cogportrait", "prototype_store")
RAY_ONLY_IN = ("training.recipes",)  # training/: Ray only in its recipes (models, data, losses, sampler are plain torch)


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    """Absolute module names a file imports (``from a import b`` gives a and a.b), nested imports too
    unless ``top_level_only`` (what runs at import time, where a cycle would break)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return out


def _project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in LAYERS:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def test_layers_point_down_and_core_is_ray_free():
    """Parsed imports (nested ones too): no package imports one above it; the core and the
    library never import Ray. Then a real import of every core module in a clean interpreter."""
    offenders = []
    for name, path in _project_modules().items():
        layer = LAYERS[name.split(".")[0]]
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top in LAYERS and LAYERS[top] > layer or top in LAYERS and top != name.split(".")[0] and LAYERS[top] == layer:
                offenders.append(f"{path.relative_to(REPO)} imports {imported}")
            if top == "ray" and name.split(".")[0] in RAY_FREE:
                offenders.append(f"{path.relative_to(REPO)} imports {imported} (Ray-free package)")
            if top == "ray" and name.startswith("training") and not name.startswith(RAY_ONLY_IN):
                offenders.append(f"{path.relative_to(REPO)} imports {imported} (Ray belongs in training/recipes)")
    assert not offenders, offenders
    modules = [m.name for m in pkgutil.walk_packages(cogportrait.__path__, "cogportrait.") if not m.name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'pipelines', 'prototype_store', 'training')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_import_cycle():
    """The module-level import graph of the project is acyclic (a cycle breaks at import time)."""
    mods = _project_modules()
    graph = {m: sorted({i for i in _imports(p, top_level_only=True) if i in mods and i != m}) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import cycle: {' -> '.join([*path, m, n])}"
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _field_tree(cls) -> dict:
    return {f.name: _field_tree(f.default_factory) if dataclasses.is_dataclass(f.default_factory) else None
            for f in dataclasses.fields(cls)}


def _key_tree(values: dict) -> dict:
    return {k: _key_tree(v) if isinstance(v, dict) else None for k, v in values.items()}


def test_params_yaml_is_the_one_source_of_every_setting():
    """Each section names every field of its config (nested ones too) and the dataclass defaults
    equal those values, so code that builds a config without params.yaml runs with the same
    settings (bench/ does) and no threshold has a second value anywhere."""
    params = load_params(REPO / "params.yaml")
    assert set(params) == set(STAGE_CONFIGS), "one params section per stage config"
    for section, cls in STAGE_CONFIGS.items():
        assert _key_tree(params[section]) == _field_tree(cls), section
        assert from_mapping(cls, params[section], section) == cls(), f"{section}: defaults differ from params.yaml"


def _stage_modules() -> dict[str, str]:
    """DVC stage -> the module its command runs (the verb's pipeline, or the index build)."""
    return {"curate": "pipelines.curate", "extract": "pipelines.extract", "invert": "pipelines.invert",
            "prototypes": "pipelines.prototypes", "index": "prototype_store.index", "kto_mine": "pipelines.kto", "kto_negatives": "pipelines.kto_negatives",
            "evaluate_stage1": "pipelines.evaluate_stage1", "train_stage2": "training.recipes.flow_matching", "train_kto": "training.recipes.kto",
            "emh_cases": "pipelines.evaluate_videos", "generate_emh": "pipelines.generate", "evaluate_videos": "pipelines.evaluate_videos"}


def test_dvc_stage_deps_cover_the_code_each_stage_runs():
    """Every project file a stage's pipeline imports (transitively, nested imports too) is a dep of
    that stage, itself or through its folder, so a code or schema change re-runs the stage."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    mods = _project_modules()
    assert set(dvc["stages"]) == set(_stage_modules())
    for stage, entry in _stage_modules().items():
        deps = [d for d in dvc["stages"][stage]["deps"] if "$" not in d]
        seen, todo = set(), [entry]
        while todo:
            name = todo.pop()
            if name not in mods or name in seen:
                continue
            seen.add(name)
            parents = name.split(".")
            todo += [".".join(parents[:i]) for i in range(1, len(parents))] + _imports(mods[name])
        missing = []
        for name in sorted(seen):
            path = mods[name].relative_to(REPO).as_posix()
            code_free = path.endswith("__init__.py") and not any(  # a docstring and a version string
                isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)) for n in ast.parse(mods[name].read_text()).body)
            if not code_free and not any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps):
                missing.append(path)
        assert not missing, f"stage {stage} imports files that are not its deps: {missing}"


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
    from cogportrait.face.model_files import face_detector_path, face_landmarker_path

    assert face_detector_path().stat().st_size > 100_000
    assert face_landmarker_path().suffix == ".task"
