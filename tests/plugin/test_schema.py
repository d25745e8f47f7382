"""The plugin takes the request fields' defaults and limits from the engine's OpenAPI document
(qgis_plugin/schema.py), and `size` gives the same grid through the CLI and through Processing.

The engine server of these tests is started from this checkout (conftest: ``cwd=REPO``, so
``python -m engine.cli`` imports this checkout's engine): the first test checks that."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
from qgis.core import QgsProcessingException

from qgis_plugin import schema
from qgis_plugin.engine_client import EngineClient, sanitised_environment

from .conftest import REPO, engine_python
from .test_processing import provider  # noqa: F401 - the fixture

#: A non-square extent: 5.0 x 5.6 km in UTM 33N (processing's order xmin,xmax,ymin,ymax), and
#: Rome in degrees (5.8 x 5.6 km on the ground, 0.07 x 0.05 degrees).
UTM_BBOX = (289000.0, 4639000.0, 294000.0, 4644600.0)
WGS84_BBOX = (12.45, 41.88, 12.52, 41.93)


def _extent(bbox, authid):
    return f"{bbox[0]!r},{bbox[2]!r},{bbox[1]!r},{bbox[3]!r} [{authid}]"


@pytest.fixture
def document(engine_env):
    return EngineClient(engine_env.url, engine_env.token).openapi()


@pytest.fixture(autouse=True)
def _forget_limits():
    yield
    schema._CURRENT.clear()


def test_the_test_engine_is_this_checkouts(engine_env):
    info = engine_env.engine.ready
    probe = subprocess.run([str(engine_python()), "-c", "import engine, json; print(json.dumps(engine.__file__))"],
                           capture_output=True, text=True, cwd=str(REPO), env=sanitised_environment(), timeout=120)
    assert json.loads(probe.stdout).startswith(str(REPO)), (probe.stdout, probe.stderr, info)


def test_the_fallback_table_is_what_the_engine_publishes(document):
    # The plugin's one copy of the defaults and limits; an engine that changes one fails this test
    # until the table follows.
    for task, fields in schema.FALLBACK.items():
        for name, expected in fields.items():
            assert schema.published(document, task, name) == expected, (task, name)
    generate = document["components"]["schemas"]["GenerateRequest"]
    assert generate["x-max-pixels"] == schema.FALLBACK_MAX_PIXELS
    live = schema.limits_from_openapi(document)
    assert live.fields == schema.fallback().fields and live.max_pixels == schema.fallback().max_pixels


def test_the_openapi_document_is_read_once_per_engine(engine_env, monkeypatch):
    client = EngineClient(engine_env.url, engine_env.token)
    first = client.openapi()
    calls = []
    monkeypatch.setattr(EngineClient, "_json", lambda self, *a, **k: calls.append(a))
    assert EngineClient(engine_env.url, engine_env.token).openapi() is first and not calls


def _changed(document):
    doc = copy.deepcopy(document)
    props = doc["components"]["schemas"]
    props["GenerateRequest"]["properties"]["steps"]["maximum"] = 500
    props["GenerateRequest"]["properties"]["guidance"]["default"] = 3.0
    props["GenerateRequest"]["properties"]["guidance"]["maximum"] = 20.0
    props["GenerateRequest"]["x-max-pixels"] = 1024 * 1024
    props["SuperresRequest"]["properties"]["factor"]["maximum"] = 16
    props["InpaintRequest"]["properties"]["steps"]["default"] = 30
    return doc


def test_the_dock_follows_the_engines_defaults_and_limits(plugin, document):
    dock = plugin.dock
    assert dock.generate.steps.maximum() == 999 and dock.generate.guidance.maximum() == 50.0
    assert dock.generate.guidance.value() == 7.5 and dock.generate.size.maximum() == 4096
    dock.generate.steps.setValue(7)  # the user's value stays; untouched ones take the new default
    dock.apply_limits(schema.limits_from_openapi(_changed(document)))
    assert dock.generate.steps.maximum() == 500 and dock.generate.steps.value() == 7
    assert (dock.generate.guidance.maximum(), dock.generate.guidance.value()) == (20.0, 3.0)
    assert dock.generate.size.maximum() == 1024
    assert dock.superres.factor.maximum() == 16
    assert dock.inpaint.steps.maximum() == 999


def test_a_dock_job_gives_the_dock_the_engines_limits(plugin, engine_env, monkeypatch, document, qtbot):
    # After talking to an engine, the dock uses what that engine publishes.
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    from qgis_plugin import engine_client

    from .conftest import wait_for_task

    key = (engine_env.url, engine_env.token)
    monkeypatch.setitem(engine_client._OPENAPI_CACHE, key, _changed(document))
    tab = plugin.dock.generate
    tab.set_extent(QgsRectangle(*UTM_BBOX), QgsCoordinateReferenceSystem("EPSG:32633"))
    tab.size.setValue(64)
    tab.steps.setValue(1)
    task = tab.run()
    assert task is not None
    wait_for_task(qtbot, task)
    assert task.error is None, task.error
    assert tab.steps.maximum() == 500 and tab.size.maximum() == 1024
    assert schema.current().max_side == 1024


def test_processing_checks_the_live_engines_limits_before_submitting(provider, engine_env, monkeypatch, document,
                                                                      tmp_path):
    # The algorithm's parameters are defined when the provider loads (the fallback's 999 steps);
    # a run is checked against the engine it talks to, before anything is submitted.
    import processing

    from qgis_plugin import engine_client

    monkeypatch.setitem(engine_client._OPENAPI_CACHE, (engine_env.url, engine_env.token), _changed(document))
    before = EngineClient(engine_env.url, engine_env.token).jobs()
    with pytest.raises(QgsProcessingException, match="steps 600 is above the engine's maximum of 500"):
        processing.run("diffusionsat:generate", {"EXTENT": _extent(UTM_BBOX, "EPSG:32633"), "SIZE": 64,
                                                 "STEPS": 600, "MODEL": "tiny", "OUTPUT": str(tmp_path / "g.tif")})
    assert len(EngineClient(engine_env.url, engine_env.token).jobs()) == len(before)


def test_processing_parameters_take_the_known_engines_limits(document):
    from qgis_plugin.processing.generate import GenerateAlgorithm
    from qgis_plugin.processing.superres import SuperresAlgorithm

    schema.remember(schema.limits_from_openapi(_changed(document)))
    alg = GenerateAlgorithm()
    alg.initAlgorithm({})
    assert alg.parameterDefinition("STEPS").maximum() == 500
    assert alg.parameterDefinition("GUIDANCE").defaultValue() == 3.0
    assert alg.parameterDefinition("SIZE").maximum() == 1024
    sr = SuperresAlgorithm()
    sr.initAlgorithm({})
    assert sr.parameterDefinition("FACTOR").maximum() == 16


@pytest.mark.parametrize("bbox, authid", [(UTM_BBOX, "EPSG:32633"), (WGS84_BBOX, "EPSG:4326")])
def test_the_cli_and_processing_make_the_same_grid_from_size(provider, engine_env, tmp_path, bbox, authid):
    # `--size 128` on the command line and SIZE=128 in Processing: the same width, height and transform
    # (the plugin sends `size`; the engine's output_size decides for both).
    import processing
    from osgeo import gdal

    cli_out = tmp_path / "cli.tif"
    run = subprocess.run(
        [str(engine_python()), "-m", "engine.cli", "generate", "--bbox", ",".join(repr(v) for v in bbox),
         "--crs", authid, "--model", "tiny", "--size", "128", "--steps", "1", "--seed", "1", "--quiet",
         "--out", str(cli_out)],
        capture_output=True, text=True, cwd=str(REPO), env=sanitised_environment(), timeout=300)
    assert run.returncode == 0, run.stderr
    qgis_out = tmp_path / "processing.tif"
    processing.run("diffusionsat:generate", {"EXTENT": _extent(bbox, authid), "SIZE": 128, "STEPS": 1,
                                             "MODEL": "tiny", "SEED": 1, "OUTPUT": str(qgis_out)})
    grids = []
    for path in (cli_out, qgis_out):
        ds = gdal.Open(str(path))
        grids.append((ds.RasterXSize, ds.RasterYSize, ds.GetGeoTransform()))
        ds = None
    assert grids[0][:2] == grids[1][:2]
    assert grids[0][2] == pytest.approx(grids[1][2], abs=1e-9)
    width, height = grids[0][:2]
    assert max(width, height) == 128 and min(width, height) < 128  # the longest side; the other follows
