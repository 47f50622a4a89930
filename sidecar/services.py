"""The services behind every request, built lazily so start-up stays fast."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from sidecar.config import Config


class Services:
    """Config, path policy, registry, model references and (in the sidecar only) the model pool."""

    def __init__(self, config: Config, *, with_pool: bool = True) -> None:
        self.config = config
        self._with_pool = with_pool

    @functools.cached_property
    def paths(self):  # -> PathPolicy
        from sidecar.paths import PathPolicy, default_roots

        return PathPolicy(default_roots(self.config.home, Path.cwd(), os.environ, self.config.extra_roots))

    @functools.cached_property
    def registry(self):  # -> Registry
        from sidecar.registry import Registry

        return Registry(self.config.home)

    @functools.cached_property
    def models(self):  # -> ModelResolver
        from sidecar.models import ModelResolver

        return ModelResolver(self.config, self.paths, lambda: self.registry)

    @functools.cached_property
    def pool(self):  # -> ModelPool | None
        if not self._with_pool:
            return None
        from sidecar.pool import ModelPool

        return ModelPool(self.config.pool_budget_bytes)

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()
