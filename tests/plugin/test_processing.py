"""The Processing algorithms: through processing.run, and through qgis_process.bin with the ZIP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QDate

from .conftest import REPO, qgis_process_bin, require_task
from .helpers import make_rgb_geotiff, make_s2_geotiff
from .test_dock import S2_BANDS

# Rome in UTM 33N (processing's extent order is xmin,xmax,ymin,ymax).
UTM_EXTENT = "289000,294000,4639000,4644600 [EPSG:32633]"
WGS84_EXTENT = "12.45,12.52,41.88,41.93 [EPSG:4326]"
TINY = {"SIZE": 64, "STEPS": 2, "MODEL": "tiny"}


@pytest.fixture(scope="module")
def provider(qgis_processing):
    from qgis_plugin.processing.provider import DiffusionSatProvider

    registry = QgsApplication.processingRegistry()
    existing = registry.providerById("diffusionsat")
    if existing is not None:
        registry.removeProvider(existing)
    prov = DiffusionSatProvider()
    assert registry.addProvider(prov)
    yield prov
    registry.removeProvider(prov)


def test_algorithms_are_registered(provider):
    ids = {alg.id() for alg in provider.algorithms()}
    assert ids == {"diffusionsat:generate", "diffusionsat:superres", "diffusionsat:inpaint",
                   "diffusionsat:temporal", "diffusionsat:extend", "diffusionsat:enginestatus"}
    gen = QgsApplication.processingRegistry().algorithmById("diffusionsat:generate")
    assert "qgis_process" in gen.shortHelpString()
    assert not int(gen.flags() & gen.FlagNoThreading)  # runs in the background, never blocks the UI


@pytest.mark.parametrize("extent, authid, size", [(UTM_EXTENT, "EPSG:32633", (56, 64)),
                                                  (WGS84_EXTENT, "EPSG:4326", (64, 64))])
def test_generate_with_processing_run(provider, engine_env, tmp_path, extent, authid, size):
    import processing

    out = tmp_path / "gen.tif"
    result = processing.run("diffusionsat:generate", {"EXTENT": extent, "DATE": "2021-06-15",
                                                      "CLOUD_COVER": 0.1, "SEED": 3, "OUTPUT": str(out), **TINY})
    assert result["OUTPUT"] == str(out) and out.exists()
    assert result["SEED"] == 3
    layer = QgsRasterLayer(str(out), "gen")
    assert layer.isValid() and layer.crs().authid() == authid and layer.bandCount() == 3
    assert (layer.width(), layer.height()) == size
    want = [float(v) for v in extent.split(" ")[0].split(",")]
    ext = layer.extent()
    assert [ext.xMinimum(), ext.xMaximum(), ext.yMinimum(), ext.yMaximum()] == pytest.approx(want)


def test_generate_run_and_load_results_styles_and_dates_the_layer(provider, engine_env, tmp_path, qgis_new_project):
    import processing

    result = processing.runAndLoadResults("diffusionsat:generate", {
        "EXTENT": UTM_EXTENT, "DATE": "2020-02-29", "OUTPUT": str(tmp_path / "loaded.tif"), **TINY})
    layer = QgsProject.instance().mapLayer(result["OUTPUT"]) if isinstance(result["OUTPUT"], str) and \
        QgsProject.instance().mapLayer(result["OUTPUT"]) else next(
            lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.source() == str(tmp_path / "loaded.tif"))
    assert layer.temporalProperties().isActive()
    assert layer.temporalProperties().fixedTemporalRange().begin().date() == QDate(2020, 2, 29)
    assert "synthetic" in layer.metadata().keywords().get("DiffusionSat", [])
    assert layer.renderer().type() == "multibandcolor"
    # in the "DiffusionSat" group with the dock's results (it was loaded at the top level)
    node = QgsProject.instance().layerTreeRoot().findLayer(layer.id())
    assert node is not None and node.parent().name() == "DiffusionSat"


def test_generate_with_spread_loads_the_styled_spread_map(provider, engine_env, tmp_path, qgis_new_project):
    import processing

    out = tmp_path / "with_spread.tif"
    result = processing.runAndLoadResults("diffusionsat:generate", {
        "EXTENT": UTM_EXTENT, "OUTPUT": str(out), "SPREAD": 2, **TINY})
    assert result["SPREAD"] == str(tmp_path / "with_spread.spread.tif")
    layers = {lyr.source(): lyr for lyr in QgsProject.instance().mapLayers().values()}
    spread = layers[result["SPREAD"]]
    assert spread.renderer().type() == "singlebandpseudocolor" and "spread over 2 seeds" in spread.name()
    node = QgsProject.instance().layerTreeRoot().findLayer(spread.id())
    assert node is not None and node.parent().name() == "DiffusionSat"
    # without SPREAD there is no spread map
    plain = processing.run("diffusionsat:generate", {"EXTENT": UTM_EXTENT, "OUTPUT": str(tmp_path / "p.tif"), **TINY})
    assert not plain.get("SPREAD") and not (tmp_path / "p.spread.tif").exists()


class CancelOnProgress(QgsProcessingFeedback):
    """Cancels as soon as the engine reports progress, like the Cancel button of the dialog."""

    def __init__(self) -> None:
        super().__init__()
        self.progressChanged.connect(lambda p: self.cancel() if p > 0 else None)


def test_processing_cancel_cancels_the_engine_job(provider, engine_env, tmp_path):
    import processing

    with pytest.raises(QgsProcessingException, match="Cancelled"):
        processing.run("diffusionsat:generate", {"EXTENT": UTM_EXTENT, "OUTPUT": str(tmp_path / "c.tif"),
                                                 "SIZE": 128, "STEPS": 200, "MODEL": "tiny"},
                       feedback=CancelOnProgress())
    from qgis_plugin.engine_client import EngineClient

    jobs = EngineClient(engine_env.url, engine_env.token).jobs()
    assert any(j.get("state") == "cancelled" for j in jobs)


def test_engine_down_is_a_processing_error_with_the_reason(provider, monkeypatch, tmp_path):
    import processing

    token = tmp_path / "t"
    token.write_text("x")
    monkeypatch.setenv("DIFFUSIONSAT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("DIFFUSIONSAT_TOKEN_FILE", str(token))
    with pytest.raises(QgsProcessingException, match="Cannot reach"):
        processing.run("diffusionsat:generate", {"EXTENT": UTM_EXTENT, "OUTPUT": str(tmp_path / "x.tif"), **TINY})


def test_processing_logs_the_plan_and_refuses_an_over_limit_job_unless_allow_large(provider, engine_env,
                                                                                  plugin_settings, tmp_path):
    import processing

    from qgis_plugin.engine_client import EngineClient

    plugin_settings.max_output_mpx = 0.001  # the 56 x 64 px image is 0.0036 Mpx
    plugin_settings.save()
    client = EngineClient(engine_env.url, engine_env.token)
    before = [j["id"] for j in client.jobs()]
    params = {"EXTENT": UTM_EXTENT, "OUTPUT": str(tmp_path / "big.tif"), **TINY}
    with pytest.raises(QgsProcessingException, match="ALLOW_LARGE") as refused:
        processing.run("diffusionsat:generate", params)
    assert "more than the limit of 0.001 Mpx" in str(refused.value)
    assert [j["id"] for j in client.jobs()] == before, "a refused job must not reach the engine"
    assert not (tmp_path / "big.tif").exists()

    feedback = QgsProcessingFeedback()
    result = processing.run("diffusionsat:generate", {**params, "ALLOW_LARGE": True}, feedback=feedback)
    assert (tmp_path / "big.tif").exists() and result["OUTPUT"] == str(tmp_path / "big.tif")
    log = feedback.textLog()
    assert "Plan: 56 × 64 px" in log and "UNet evaluations" in log and "an estimate" in log
    assert "ALLOW_LARGE is set" in log


def test_engine_status(provider, engine_env):
    import processing

    result = processing.run("diffusionsat:enginestatus", {})
    assert json.loads(result["HEALTH"])["status"] == "ok"
    assert any(m["name"] == "tiny" for m in json.loads(result["MODELS"])["models"])


def test_every_task_has_steps_guidance_and_seed_with_the_engines_defaults(provider):
    """The dialogs of the conditional tasks have STEPS/GUIDANCE/SEED like generate's, each with
    its own task's default from the schema (in-painting guides at 7.5, the ControlNets at 1)."""
    from qgis_plugin import schema

    limits = schema.current()
    for task in ("generate", "superres", "inpaint", "temporal", "extend"):
        alg = provider.algorithm(task)
        for name, field in (("STEPS", "steps"), ("GUIDANCE", "guidance"), ("SEED", "seed")):
            param = alg.parameterDefinition(name)
            assert param is not None, f"{task} has no {name}"
            bounds = limits.get(task, field)
            assert param.minimum() == bounds.minimum
            if bounds.default is not None:
                assert param.defaultValue() == bounds.default, (task, name)
    assert provider.algorithm("inpaint").parameterDefinition("GUIDANCE").defaultValue() != \
        provider.algorithm("superres").parameterDefinition("GUIDANCE").defaultValue()


def test_superres_inpaint_temporal_with_processing_run(provider, engine_env, tmp_path):
    import processing

    done = []
    if engine_env.supports("superres")[0]:
        s2 = make_s2_geotiff(tmp_path / "s2.tif", bands=S2_BANDS, size=16)
        res = processing.run("diffusionsat:superres", {"INPUT": str(s2), "FACTOR": 2, "MODEL": "tiny",
                                                       "STEPS": 2, "SEED": 11, "OUTPUT": str(tmp_path / "sr.tif")})
        assert QgsRasterLayer(res["OUTPUT"], "sr").width() == 32
        assert res["SEED"] == 11  # the dialog's own SEED field reaches the engine
        done.append("superres")
    if engine_env.supports("inpaint")[0]:
        rgb = make_rgb_geotiff(tmp_path / "rgb.tif", hole=True)
        res = processing.run("diffusionsat:inpaint", {"INPUT": str(rgb), "MASK_KIND": 3, "MODEL": "tiny",
                                                      "STEPS": 2, "SEED": 5, "OUTPUT": str(tmp_path / "ip.tif")})
        assert QgsRasterLayer(res["OUTPUT"], "ip").isValid()
        assert res["SEED"] == 5
        done.append("inpaint")
    if engine_env.supports("temporal")[0]:
        a = make_rgb_geotiff(tmp_path / "a.tif", seed=1)
        b = make_rgb_geotiff(tmp_path / "b.tif", seed=2)
        res = processing.run("diffusionsat:temporal", {"INPUTS": [str(a), str(b)], "INPUT_DATES": "2020-05-01,2020-07-01",
                                                       "DATE": "2020-06-01", "MODEL": "tiny",
                                                       "OPTIONS": '{"steps": 2}', "OUTPUT": str(tmp_path / "tp.tif")})
        assert QgsRasterLayer(res["OUTPUT"], "tp").isValid()
        done.append("temporal")
    if not done:
        pytest.skip("the engine runs none of superres, inpaint, temporal yet")


def test_qgis_process_runs_generate_from_the_packaged_plugin(engine_env, tmp_path):
    """``qgis_process.bin`` (3.22's wrapper passes an option the binary rejects) with the ZIP's
    plugin on QGIS_PLUGINPATH, enabled in a fresh profile, engine from the environment."""
    binary = qgis_process_bin()
    if binary is None:
        pytest.skip("qgis_process.bin is not installed (apt-get install qgis)")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import package_plugin
    finally:
        sys.path.pop(0)
    zip_path = package_plugin.build(tmp_path / "dist")
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(plugins)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGIS_")}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_PLUGINPATH=str(plugins),
               QGIS_CUSTOM_CONFIG_PATH=str(tmp_path / "profile"),
               DIFFUSIONSAT_URL=engine_env.url, DIFFUSIONSAT_TOKEN_FILE=str(engine_env.token_file))
    enable = subprocess.run([binary, "plugins", "enable", "diffusionsat"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert enable.returncode == 0, enable.stdout + enable.stderr
    out = tmp_path / "qp.tif"
    run = subprocess.run([binary, "--json", "run", "diffusionsat:generate", "--",
                          f"EXTENT={UTM_EXTENT}", "DATE=2021-06-15", "SIZE=64", "STEPS=2", "MODEL=tiny",
                          "SEED=11", f"OUTPUT={out}"], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    payload = json.loads(run.stdout[run.stdout.index("{"):])
    assert payload["results"]["OUTPUT"] == str(out)
    assert payload["results"]["SEED"] == 11
    layer = QgsRasterLayer(str(out), "qp")
    assert layer.isValid() and layer.crs() == QgsCoordinateReferenceSystem("EPSG:32633")
    assert (layer.width(), layer.height()) == (56, 64)
