"""Adding config keys to a diffusers model subclass without re-listing the parent's arguments.

diffusers records a model's configuration from its ``__init__`` signature (``register_to_config``
and ``extract_init_dict`` read ``inspect.signature``). A subclass that only adds a few keys
(``use_metadata``, ``num_metadata``, ...) would otherwise have to repeat the parent's ~40
parameters. :func:`extends_config_of` gives the subclass's ``__init__`` the parent's signature
plus the new keyword-only parameters, then applies ``register_to_config`` once for all of them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from diffusers.configuration_utils import register_to_config


def undecorated_init(parent: type) -> Callable[..., None]:
    """The parent's ``__init__`` without its ``register_to_config`` wrapper (no double registration)."""
    init = parent.__init__
    return getattr(init, "__wrapped__", init)


def extends_config_of(parent: type, **extra: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a subclass ``__init__(self, *args, <extra keyword-only>, **kwargs)``.

    ``extra`` maps the new config keys to their defaults.
    """

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        params = [
            p
            for p in inspect.signature(undecorated_init(parent)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in extra
        ]
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in extra.items()]
        init.__signature__ = inspect.Signature(params)
        return register_to_config(init)

    return decorate
