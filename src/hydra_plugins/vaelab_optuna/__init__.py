"""vaelab's Optuna sweeper as a Hydra plugin (Hydra loads sweepers from ``hydra_plugins``):
``hydra/sweeper=optuna`` (src/vaelab/conf/hydra/sweeper/optuna.yaml). The work is done by
``vaelab.search.OptunaSearch``."""

from __future__ import annotations

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from vaelab.search import OptunaSearch


class OptunaSweeper(Sweeper):
    """Searches with Optuna, pruning trials from their validation curves; see vaelab.search."""

    def __init__(self, **options) -> None:
        self.search = OptunaSearch(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]):
        return self.search.sweep(arguments)
