"""The most steps the schema allows run with every sampler on the released scheduler config.

SD 2.1's scheduler config (and so every DiffusionSat checkpoint's, and the tiny preset's) has
1000 training timesteps and ``steps_offset`` 1: 1000 DDIM/PNDM/DDPM steps would ask for timestep
1000 and crash in the middle of a job (an internal error on the server).
"""

import json

import pytest

from engine.errors import InvalidRequest
from engine.models.configs import resource_path
from engine.schedulers import make_scheduler, scheduler_from_config, set_timesteps
from engine.tasks import SCHEDULER_NAMES, GenerateRequest, parse_request

MAX_STEPS = GenerateRequest.model_fields["steps"].metadata[1].le


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_the_schema_maximum_stays_within_the_training_timesteps(name):
    config = json.loads(resource_path("tiny", "scheduler.json").read_text())
    assert config["steps_offset"] == 1 and config["num_train_timesteps"] == 1000  # as SD 2.1's
    # set_timesteps: what the pipelines call (with "leading" spacing and steps_offset 1, which the
    # solvers now take from the checkpoint as DDIM does, diffusers itself would ask for timestep 1000)
    scheduler = set_timesteps(make_scheduler(name, scheduler_from_config(config)), MAX_STEPS)
    assert int(max(scheduler.timesteps)) < scheduler.config.num_train_timesteps


def test_more_steps_are_refused_with_the_field_named():
    with pytest.raises(InvalidRequest, match="steps"):
        parse_request({"task": "generate", "bbox": [0, 0, 1, 1], "steps": MAX_STEPS + 1})
