"""One validation: ``--dry-run``, ``engine.tasks.plan``, the real run and the server (``POST /v1/plan``
and the check before ``202``) refuse exactly the same requests, with the same message.

Each case is a request the real run refuses; before the one check existed, ``--dry-run`` accepted
most of them and the server answered 202 and failed the job later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from engine.cli import main
from engine.errors import DiffusionSatError
from engine.tasks import parse_request, plan

from .conftest import call

UTM = "EPSG:32633"
ROME = ["--bbox", "12.45,41.88,12.52,41.93", "--date", "2021-06-15"]
FAST = ["--model", "tiny", "--steps", "1", "--seed", "1", "--quiet"]


def write(path: Path, array, *, origin=(300000.0, 4650000.0), res=10.0, tags=None) -> str:
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    profile = dict(driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                   dtype=str(array.dtype), crs=UTM, transform=from_origin(origin[0], origin[1], res, res))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)
        if tags:
            ds.update_tags(**tags)
    return str(path)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_folder) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    rgb = (rng.random((3, 64, 64)) * 255).astype("uint8")
    s2 = d / "S2_folder"
    s2.mkdir()
    for band in ("B02", "B03", "B04"):  # 7 of the 10 bands the model needs are missing
        write(s2 / f"T33TTG_20210615T101031_{band}.tif", (rng.random((16, 16)) * 2000 + 800).astype("uint16"))
    garbage = d / "broken.tif"
    garbage.write_bytes(b"II*\x00" + b"\x00garbage" * 64)
    return {
        "rgb": write(d / "scene_2021-06-15.tif", rgb),
        "rgb2": write(d / "scene_2020-06-15.tif", rgb),
        "undated": write(d / "undated.tif", rgb),
        "s2": str(s2),
        "s2_stack": write(d / "s2.tif", (rng.random((13, 16, 16)) * 2000 + 800).astype("uint16"),
                          tags={"PRODUCT_TYPE": "S2MSI1C", "PROCESSING_BASELINE": "04.00"}),
        "broken": str(garbage),
        "far_mask": write(d / "far_mask.tif", np.ones((16, 16), "uint8"), origin=(500000.0, 4000000.0)),
        "out_dir": str(d),
        "single_image_model": str(tiny_folder),  # a UNet and no ControlNet
    }


def cases(f: dict[str, str]) -> list[tuple[str, list[str], str, bool]]:
    """(name, CLI args without --out, expected part of the message, whether the server sees it too)."""
    s2 = ["superres", "--input"]
    return [
        ("generate output folder missing", ["generate", *ROME, *FAST, "--out",
                                            str(Path(f["out_dir"]) / "no" / "such" / "x.tif")],
         "does not exist; create it", False),
        ("output not .tif", ["generate", *ROME, *FAST, "--out", str(Path(f["out_dir"]) / "x.png")],
         "must end in .tif", False),
        ("missing model folder", ["generate", *ROME, "--model", str(Path(f["out_dir"]) / "no-model"),
                                  "--steps", "1", "--quiet"], "does not exist", False),
        ("cuda without a GPU", ["generate", *ROME, *FAST, "--device", "cuda"], "no CUDA GPU", True),
        ("model without the task's ControlNet", [*s2, f["s2_stack"], "--model", f["single_image_model"],
                                                 "--steps", "1", "--quiet"], "has no ControlNet for superres", True),
        ("S2 folder missing bands", [*s2, f["s2"], *FAST], "B05", True),
        ("bad mask rule", ["inpaint", "--input", f["rgb"], "--mask", f["rgb"], "--mask-rule", "bits:9-2=1",
                           *FAST], "first bit", True),
        ("superres pixel limit", [*s2, f["s2_stack"], "--max-pixels", "1000", *FAST], "over the limit of 0.001 Mpx (1000 px)",
         True),
        ("temporal pixel limit", ["temporal", "--input", f["rgb"], "--date", "2022-01-01", "--max-pixels", "100",
                                  *FAST], "over the limit of 0.0001 Mpx (100 px)", True),
        ("unreadable raster", ["inpaint", "--input", f["broken"], *FAST], "cannot read", True),
        ("mask does not overlap", ["inpaint", "--input", f["rgb"], "--mask", f["far_mask"], *FAST],
         "does not overlap", True),
        ("date count mismatch", ["temporal", "--input", f["rgb"], "--input", f["rgb2"], "--input-date",
                                 "2020-01-01", "--date", "2022-01-01", *FAST], "1 dates given for 2 inputs", True),
        ("undated temporal input", ["temporal", "--input", f["undated"], "--date", "2022-01-01", *FAST],
         "no acquisition date", True),
        ("rgb band beyond the input", ["inpaint", "--input", f["rgb"], "--rgb-bands", "1,2,5", *FAST],
         "has 3 band(s)", True),
        ("resample without a stateless scheduler", ["inpaint", "--input", f["rgb"], "--resample", "1",
                                                    "--scheduler", "dpm++", *FAST], "--resample needs", True),
    ]


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1].split(": error: ", 1)[-1] if err else "")


def _request_of(args: list[str]):
    """The request the CLI builds for ``args`` (the parser is the CLI's own)."""
    from engine.cli import _request_fields, build_parser

    ns = build_parser().parse_args(args)
    return parse_request(_request_fields(ns)), ns.out


def test_dry_run_plan_run_and_server_refuse_the_same_requests(files, capsys, server, tmp_path):
    for name, args, expected, on_server in cases(files):
        if name == "cuda without a GPU" and _cuda():
            continue
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / f"{name.replace(' ', '_')}.tif")]
        out = Path(args[args.index("--out") + 1])
        dry_code, dry = _cli(capsys, [*args, "--dry-run"])
        run_code, ran = _cli(capsys, args)
        request, out_arg = _request_of(args)
        with pytest.raises(DiffusionSatError) as planned:
            plan(request, out_arg)
        assert (dry_code, run_code) == (2, 2), f"{name}: --dry-run exit {dry_code}, run exit {run_code}: {dry}"
        message = str(planned.value).splitlines()[0]  # the CLI shows the first line (and "see --help")
        assert dry.removesuffix(" (see --help)") == ran.removesuffix(" (see --help)") == message, name
        assert expected in dry, f"{name}: {dry}"
        assert "0 Mpx" not in dry
        assert not out.exists(), name
        if on_server:
            body = request.model_dump(mode="json", exclude_none=True)
            replies = [call(server, "POST", path, json_body=body) for path in ("/v1/plan", "/v1/jobs")]
            assert [r.status for r in replies][0] == replies[1].status and 400 <= replies[0].status < 500, \
                f"{name}: {[(r.status, r.body[:200]) for r in replies]}"
            assert replies[0].json["detail"] == replies[1].json["detail"], name
            assert replies[0].json["detail"].splitlines()[0] == message, name


def test_a_valid_request_passes_all_of_them(files, capsys, server, tmp_path):
    out = tmp_path / "ok.tif"
    args = ["inpaint", "--input", files["rgb"], *FAST, "--out", str(out)]
    assert _cli(capsys, [*args, "--dry-run"])[0] == 0
    request, _ = _request_of(args)
    body = request.model_dump(mode="json", exclude_none=True)
    reply = call(server, "POST", "/v1/plan", json_body=body)
    assert reply.status == 200, reply.body
    assert reply.json["tiles"] == plan(request, out)["tiles"]


def test_the_served_openapi_document_carries_the_models_defaults_and_limits(server):
    from engine.tasks import REQUEST_MODELS

    doc = call(server, "GET", "/v1/openapi.json").json
    schemas = doc["components"]["schemas"]
    gen = schemas["GenerateRequest"]["properties"]
    assert gen["steps"]["default"] == 20 and gen["steps"]["maximum"] == 999 and gen["guidance"]["default"] == 7.5
    for task, model in REQUEST_MODELS.items():  # every default and bound of the models, as served
        served = schemas[model.__name__]["properties"]
        for name, info in model.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if not info.is_required() and default is not None and name != "task":
                assert served[name].get("default") == (list(default) if isinstance(default, tuple) else default), \
                    (task, name)
