"""The composition root: every verb through one registry, one override syntax, one error policy."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from cogportrait.config import STAGE_CONFIGS, ConfigError, load_params
from pipelines.cli import VERBS, load_configs, build_parser, main

from conftest import REPO

CHOICE_KEYS = {"curate": "scene_detector", "extract": "au_backend", "invert": "pose_refine", "index": "search", "kto_negatives": "split"}
CONFIG_VERBS = [name for name, verb in VERBS.items() if verb.sections]
REQUIRED_ARGS = {"library query": ["--target", "AU45=1"], "compile": ["--out", "/tmp/cogportrait-cli-test"],
                 "face fit-generic": ["--frames", "/tmp/cogportrait-cli-test", "--out", "/tmp/cogportrait-cli-test"]}


def _argv(verb: str) -> list[str]:
    return [*verb.split(), *REQUIRED_ARGS.get(verb, [])]


def _numeric_key(section: str) -> str:
    hints = typing.get_type_hints(STAGE_CONFIGS[section])
    return next(f.name for f in dataclasses.fields(STAGE_CONFIGS[section]) if hints[f.name] in (int, float))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb.split(), "--help"])
    assert exit_info.value.code == 0
    assert VERBS[verb].help.split()[0] in capsys.readouterr().out


@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_bad_command_line_values_exit_2_with_one_line(verb, capsys):
    section = VERBS[verb].sections[0]
    key = _numeric_key(section)
    assert main([*_argv(verb), "--set", f"{section}.{key}=not-a-number"]) == 2
    assert f"{section}.{key}" in _one_error_line(capsys)
    assert main([*_argv(verb), "--set", f"{section}.no_such_key=1"]) == 2
    line = _one_error_line(capsys)
    assert f"{section}.no_such_key" in line and key in line  # names the key and the known ones
    if section in CHOICE_KEYS:
        assert main([*_argv(verb), "--set", f"{section}.{CHOICE_KEYS[section]}=bogus"]) == 2
        assert "choose one of" in _one_error_line(capsys)


@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_bad_params_yaml_values_exit_2_with_one_line(verb, tmp_path, capsys):
    params = load_params(REPO / "params.yaml")
    section = VERBS[verb].sections[0]
    for broken, expected in (
        ({_numeric_key(section): "abc"}, f"{section}.{_numeric_key(section)}"),
        ({"unknown_key": 1}, f"{section}.unknown_key"),
        ({CHOICE_KEYS.get(section, "num_workers"): ["a", "list"]}, section),
    ):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({**params, section: {**params[section], **broken}}))
        assert main(["--params", str(path), *_argv(verb)]) == 2
        assert expected in _one_error_line(capsys)


def test_flags_and_set_override_the_same_keys():
    args = build_parser().parse_args(["--params", str(REPO / "params.yaml"), "invert", "--workers", "3",
                                      "--set", "inversion.iterations=7", "--set", "events.blink_max_s=0.3"])
    cfg = load_configs(VERBS["invert"], args)["invert"]
    assert cfg.num_workers == 3 and cfg.inversion.iterations == 7 and cfg.events.blink_max_s == 0.3
    args = build_parser().parse_args(["library", "build", "--out", "/tmp/lib", "--set", "nprobe=4"])
    cfgs = load_configs(VERBS["library build"], args)
    assert cfgs["prototypes"].out == cfgs["index"].library == "/tmp/lib" and cfgs["index"].nprobe == 4
    args = build_parser().parse_args(["invert", "--set", "inversion=3"])
    with pytest.raises(ConfigError, match="is a section"):
        load_configs(VERBS["invert"], args)


def test_unknown_verb_and_bad_flag_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-verb"])
    assert exit_info.value.code == 2
    _one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["library", "query", "--target", "AU45=1", "-k", "many"])
    assert exit_info.value.code == 2
    assert "-k" in _one_error_line(capsys)
