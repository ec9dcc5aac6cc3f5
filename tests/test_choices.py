"""One enum per closed set of options: configs, the command line and JSON records agree on the same strings."""

from __future__ import annotations

import json

import pytest

from medldm.choices import Choice, Kind, Planes, Prior, Profile, Sampler
from medldm.config import Task
from tests.helpers import medldm


@pytest.mark.parametrize("member", [m for enum in (Kind, Profile, Planes, Prior, Sampler) for m in enum], ids=str)
def test_a_choice_is_its_string_everywhere(member: Choice):
    value = member.value
    assert member == value and hash(member) == hash(value)
    assert {value: 1}[member] == 1 and {member: 1}[value] == 1  # dicts read from model.json still match
    assert str(member) == f"{member}" == value and json.dumps(member) == json.dumps(value)


def test_configs_take_the_strings_and_refuse_others():
    task = Task(kind="slice-profile", scale=4, profile="boxcar")
    assert task.kind is Kind.slice_profile and task.profile is Profile.boxcar
    with pytest.raises(ValueError, match="slice-profile"):
        Task(kind="thick", scale=4)


def test_the_command_line_offers_the_same_values():
    import typing

    import typer
    from medldm.cli import app

    def enum_of(command: str, option: str):
        params = {p.name: p for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]
        annotation = params[option].type_descriptor.annotation
        return next((a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)), None)

    assert enum_of("upscale", "kind") is Kind and enum_of("upscale", "planes") is Planes
    assert enum_of("degrade", "profile") is Profile and enum_of("fuse", "prior") is Prior
    assert enum_of("upscale", "sampler") is Sampler and enum_of("evaluate", "sampler") is Sampler
    refused = medldm("degrade", "scan.nii.gz", "out.nii.gz", "--kind", "thick")
    assert refused.returncode != 0 and all(value in refused.stderr for value in Kind.values())


def test_the_sampler_choices_are_the_registered_samplers():
    from medldm.diffusion import SAMPLERS

    assert set(Sampler.values()) == set(SAMPLERS)
