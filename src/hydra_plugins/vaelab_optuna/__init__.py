"""vaelab's Optuna sweeper as a Hydra plugin (Hydra loads sweepers from ``hydra_plugins``):
``hydra/sweeper=optuna`` (src/vaelab/conf/hydra/sweeper/optuna.yaml). The work is done by
``vaelab.search.OptunaSearch``."""

from __future__ import annotations

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Searches with Optuna, pruning trials from their validation curves; see vaelab.search."""

    def __init__(self, **options) -> None:
        # Optuna is an extra: imported here, not when Hydra scans its plugins on every run, and its
        # sampler and pruner are built only once it is known to be there (the config is not recursive)
        try:
            from vaelab.search import OptunaSearch
        except ModuleNotFoundError as error:
            if error.name != "optuna":
                raise
            raise ModuleNotFoundError(
                "hydra/sweeper=optuna (hparams_search=...) searches with Optuna, which is not installed: "
                'run pip install -e ".[optuna]" in the repository.'
            ) from error
        self.search = OptunaSearch(**instantiate(options, _convert_="all"))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]):
        return self.search.sweep(arguments)
