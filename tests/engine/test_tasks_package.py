"""The engine.tasks package: light to import, and registries that name real task modules."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "rasterio")


def test_importing_the_task_api_and_the_request_schema_loads_no_heavy_library():
    """The CLI builds its parser from engine.tasks(.requests): `diffusionsat --help` must not pay for
    torch, diffusers or rasterio, so neither module may import them (directly or through another)."""
    code = ("import json, sys; import engine.tasks, engine.tasks.requests; "
            "from engine.tasks import REQUEST_MODELS, parse_request, RUNNERS, LAYOUTS; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_checks_and_the_model_registry_load_no_model_library():
    """check() and plan() (every refusal, --dry-run, POST /v1/plan) and the models listing read
    files, not weights: they must answer without paying seconds for torch, diffusers, transformers."""
    code = ("import json, sys; import engine.tasks.checks, engine.tasks.common, engine.models.registry; "
            "print(json.dumps([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_every_task_has_a_runner_and_every_tiled_task_a_layout():
    from engine.tasks import LAYOUTS, REQUEST_MODELS, RUNNERS, layout_of, runner_of
    from engine.tasks.common import Layout

    assert set(RUNNERS) == set(REQUEST_MODELS)
    assert set(LAYOUTS) == set(REQUEST_MODELS) - {"generate"}
    for task in RUNNERS:
        assert callable(runner_of(task))
    for task in LAYOUTS:
        assert layout_of(task).__annotations__["return"] in ("Layout", Layout)


def test_the_heavy_public_names_resolve_from_the_package():
    import engine.tasks
    from engine.tasks import checks, common, run

    assert engine.tasks.run_task is run.run_task and engine.tasks.plan is checks.plan
    assert engine.tasks.check is checks.check and engine.tasks.TaskResult is common.TaskResult
    try:
        engine.tasks.no_such_name  # noqa: B018 - the lookup itself is the test
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
