"""What ``help(DiffusionSatPipeline)`` tells a researcher: every public method says what it does,
and ``__call__`` gives the output's shape and range and the units of its inputs."""

from __future__ import annotations

import inspect

import pytest

from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline
from engine.pipelines.inpaint import DiffusionSatInpaintPipeline, Inpaint
from engine.pipelines.text2img import DiffusionSatPipeline

OURS = "engine.pipelines"


@pytest.mark.parametrize("cls", [DiffusionSatPipeline, DiffusionSatControlNetPipeline, DiffusionSatInpaintPipeline])
def test_every_public_method_of_ours_has_a_docstring(cls):
    undocumented = []
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name != "__call__":
            continue
        func = getattr(member, "__func__", member)
        if not callable(func) or not getattr(func, "__module__", "").startswith(OURS):
            continue  # diffusers' own methods are documented by diffusers
        if not inspect.getdoc(getattr(cls, name)):
            undocumented.append(name)
    assert undocumented == []


def test_call_gives_shapes_ranges_and_units():
    doc = inspect.getdoc(DiffusionSatPipeline.__call__)
    assert "(b, H, W, 3)" in doc and "[0, 1]" in doc  # what .images is
    assert "px" in doc and "multiples of 8" in doc  # height/width
    assert "m/px" in doc and "degrees" in doc and "FIELDS" in doc  # what metadata is


@pytest.mark.parametrize("cls", [Control, Inpaint])
def test_conditioning_inputs_document_every_field(cls):
    doc = inspect.getdoc(cls)
    for field in cls.__dataclass_fields__:
        if field not in ("scale", "guess_mode"):  # ControlNet's as in diffusers
            assert f"``{field}``" in doc, field
