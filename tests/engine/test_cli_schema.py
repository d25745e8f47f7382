"""The CLI's task options come from the request models; the parser is cheap to build; progress
lines go to stderr when it is not a terminal."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.progress import Progress, ProgressLines
from engine.tasks import REQUEST_MODELS

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "rasterio", "pyproj", "numpy", "tqdm", "fastapi")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_building_the_parser_imports_no_heavy_library():
    code = ("import sys; from engine.cli import build_parser; p = build_parser(); p.format_help(); "
            "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in ('generate', 'inpaint')]; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["generate", "--help"]])
def test_help_and_version_import_no_heavy_library(args):
    code = ("import sys; from engine.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]


def _subparser(task: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[task]


@pytest.mark.parametrize("task", list(REQUEST_MODELS))
def test_every_request_field_is_an_option_with_the_models_default_and_range(task):
    model = REQUEST_MODELS[task]
    actions = {a.dest: a for a in _subparser(task)._actions}
    fields = {n for n, f in model.model_fields.items()
              if n != "task" and (f.json_schema_extra or {}).get("cli") is not False}
    assert fields <= set(actions), fields - set(actions)
    for name in fields:
        action, info = actions[name], model.model_fields[name]
        assert action.default is None, name  # an option not given leaves the model's default
        assert action.required == info.is_required(), name
        default = info.get_default(call_default_factory=True)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and default < 1 << 20:
            assert f"default {default:g}" in action.help, (name, action.help)
    assert "1..999; default 20" in actions["steps"].help
    want = {"generate": 7.5, "inpaint": 7.5, "extend": 7.5, "superres": 1, "temporal": 1}[task]
    assert f"default {want:g}" in actions["guidance"].help
    assert actions["scheduler"].choices == list(model.model_fields["scheduler"].annotation.__args__)
    assert actions["dtype"].choices == ["auto", "fp32", "fp16", "bf16"]


def test_existing_flag_spellings_are_kept():
    temporal = {a.dest: a.option_strings for a in _subparser("temporal")._actions}
    assert temporal["inputs"] == ["--input"] and temporal["input_dates"] == ["--input-date"]
    inpaint = {a.dest: a.option_strings for a in _subparser("inpaint")._actions}
    assert inpaint["references"] == ["--reference"] and inpaint["reference_dates"] == ["--reference-date"]
    assert inpaint["rgb_bands"] == ["--rgb-bands"] and inpaint["mask_rule"] == ["--mask-rule"]
    assert "bbox" not in inpaint  # in-painting fills the whole input


def test_a_field_of_the_model_changes_the_cli(monkeypatch):
    """The options are read from the model at parser build time: a default changed there is the CLI's."""
    from engine.cli import _request_fields

    ns = build_parser().parse_args(["generate", "--bbox", "1,2,3,4", "--out", "x.tif"])
    fields = _request_fields(ns)
    assert fields == {"task": "generate", "bbox": (1.0, 2.0, 3.0, 4.0)}  # everything else: the model's
    request = REQUEST_MODELS["generate"].model_validate(fields)
    assert (request.steps, request.guidance, request.crs) == (20, 7.5, "EPSG:4326")


def test_bad_rgb_bands_is_a_usage_error(capsys, tmp_path):
    from engine.cli import main

    code = main(["inpaint", "--input", str(tmp_path / "x.tif"), "--rgb-bands", "a,b,c", "--out",
                 str(tmp_path / "o.tif")])
    err = capsys.readouterr().err
    assert code == 2 and "--rgb-bands 'a,b,c' must be band numbers" in err and "internal error" not in err


def test_openapi_shows_defaults_and_limits():
    """The server's /openapi.json embeds these schemas (engine.server.app._job_request_schemas)."""
    from engine.server.app import _job_request_schemas

    _, components = _job_request_schemas()
    gen = components["GenerateRequest"]["properties"]
    assert gen["steps"]["default"] == 20 and (gen["steps"]["minimum"], gen["steps"]["maximum"]) == (1, 999)
    assert gen["guidance"]["default"] == 7.5 and gen["guidance"]["maximum"] == 50
    assert set(gen["scheduler"]["enum"]) >= {"default", "ddim", "dpm++"}
    inp = components["InpaintRequest"]["properties"]
    assert inp["dilate"]["default"] == 2 and inp["dilate"]["maximum"] == 256
    assert components["SuperresRequest"]["properties"]["max_pixels"]["default"] == 64 * 1024 * 1024
    json.dumps(components)  # serialisable as served


# ------------------------------------------------------------------------------------------------
# progress without a terminal


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_rate_bounded_and_carry_step_tile_and_eta():
    stream, clock = io.StringIO(), _Clock()
    lines = ProgressLines(stream, label="diffusionsat superres", interval=10.0, clock=clock)
    tiles, steps = 4, 50
    for tile in range(tiles):
        for step in range(steps + 1):
            lines(Progress(step=step, total_steps=steps, tile=tile, total_tiles=tiles))
            clock.now += 0.5  # 200 updates over 100 s
    text = stream.getvalue().splitlines()
    assert 10 <= len(text) <= 12  # one at the start, one per 10 s, the end
    assert text[0].startswith("diffusionsat superres: tile 1/4, step 0/50, 0%")
    assert "ETA" in text[3] and "tile" in text[3]
    assert "100%" in text[-1] and "ETA" not in text[-1]


def test_progress_lines_of_a_tiled_run_end_once_and_show_no_fake_steps():
    """run_tiled reports each finished tile as step 0 of 1 and then "writing the last rows": the
    lines showed "step 0/1" between tiles and the 100 % end three times."""
    stream, clock = io.StringIO(), _Clock()
    lines = ProgressLines(stream, label="diffusionsat superres", interval=10.0, clock=clock)
    tiles, steps = 3, 4
    for tile in range(tiles):
        for step in range(steps + 1):
            lines(Progress(step=step, total_steps=steps, tile=tile, total_tiles=tiles, message="denoising"))
            clock.now += 2.0
        lines(Progress(0, 1, tile + 1, tiles, f"tile {tile + 1}/{tiles}"))  # as engine.geo.accumulate.run_tiled
    lines(Progress(0, 1, tiles, tiles, "writing the last rows"))
    text = stream.getvalue().splitlines()
    assert [line for line in text if "100%" in line] == [text[-1]]
    assert text[-1].startswith("diffusionsat superres: tile 3/3, step 4/4, 100%")
    assert not [line for line in text if "step 0/1" in line], text


def test_cli_prints_progress_lines_when_stderr_is_a_pipe(tmp_path):
    out = tmp_path / "a.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "generate", "--bbox", "12.45,41.88,12.52,41.93", "--model", "tiny",
         "--steps", "3", "--size", "64", "--seed", "1", "--out", str(out)],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("diffusionsat generate: step")]
    assert progress and progress[-1].startswith("diffusionsat generate: step 3/3, 100%")
    assert "\r" not in proc.stderr  # no bar redraws in a log


def test_a_field_added_to_a_model_becomes_an_option(monkeypatch):
    """What another change adds to a request model (e.g. a resolution) is a CLI option at once."""
    from typing import Optional

    from pydantic import Field

    from engine import tasks
    from engine.cli import _request_fields

    class WithResolution(tasks.GenerateRequest):
        resolution: Optional[float] = Field(None, gt=0, description="output GSD in m/px")
        preview: bool = Field(False, description="a quick look")

    monkeypatch.setitem(tasks.REQUEST_MODELS, "generate", WithResolution)
    help_text = _subparser("generate").format_help()
    assert "--resolution" in help_text and "output GSD in m/px (> 0)" in help_text and "--no-preview" in help_text
    ns = build_parser().parse_args(["generate", "--bbox", "1,2,3,4", "--resolution", "0.5", "--preview",
                                    "--out", "x.tif"])
    assert _request_fields(ns) == {"task": "generate", "bbox": (1.0, 2.0, 3.0, 4.0), "resolution": 0.5,
                                   "preview": True}


def test_generate_json_reports_the_denoising_steps_it_ran(tmp_path, capsys):
    """The CLI's generate ran the task without run_task's meter: denoise_steps was null in --json
    (the server's result and the other commands have it)."""
    from engine.cli import main

    assert main(["generate", "--bbox", "12.45,41.88,12.52,41.93", "--model", "tiny", "--size", "64", "--steps", "3",
                 "--seed", "1", "--quiet", "--json", "--out", str(tmp_path / "g.tif")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["denoise_steps"] == 3 and result["denoise_seconds"] > 0


def test_dry_run_needs_no_out_but_a_run_does(tmp_path, capsys):
    """`generate --bbox ... --dry-run` was refused for want of --out, though it writes nothing."""
    from engine.cli import main

    argv = ["generate", "--bbox", "12.45,41.88,12.52,41.93", "--model", "tiny", "--size", "64"]
    assert main([*argv, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 64
    assert main([*argv, "--dry-run", "--out", str(tmp_path / "x.png")]) == 2  # a given --out is still checked
    assert ".tif" in capsys.readouterr().err
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "required: --out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_batch_size_and_compile_take_no_lax_coercion():
    """The attacker trial: JSON ``"batch_size": true`` and ``"compile": "yes"`` (or 1) were taken as
    1 and True; they are a mistake in a client, refused with the field's name."""
    from engine.errors import InvalidRequest
    from engine.tasks.requests import parse_request

    base = {"task": "generate", "bbox": [12.45, 41.88, 12.5, 41.92]}
    for bad, field in (({"batch_size": True}, "batch_size"), ({"batch_size": "2"}, "batch_size"),
                       ({"compile": "yes"}, "compile"), ({"compile": 1}, "compile")):
        with pytest.raises(InvalidRequest, match=field):
            parse_request({**base, **bad})
    ok = parse_request({**base, "batch_size": 2, "compile": True})
    assert (ok.batch_size, ok.compile) == (2, True)


def test_an_unknown_option_names_the_commands_own_help(capsys):
    """`extend --spread 2` (extend has no --spread) pointed at `diffusionsat --help`, whose list of
    commands does not say which options extend takes; the command's own help does."""
    from engine.cli import main

    code = main(["extend", "--input", "x.tif", "--bbox", "1,2,3,4", "--spread", "2", "--out", "o.tif"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("diffusionsat extend: error: unrecognized arguments: --spread 2 "
                                 "(see diffusionsat extend --help)"), err
    assert main(["--bogus"]) == 2
    assert "see diffusionsat --help" in capsys.readouterr().err
