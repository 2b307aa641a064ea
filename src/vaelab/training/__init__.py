"""What the Lightning module does around each step, each in a small home of its own: the
finiteness guard, when the optimizer steps (accumulation, clipping), the learning-rate
schedule and the average of the weights."""

from vaelab.training.ema import WeightEMA
from vaelab.training.guard import FinitenessGuard
from vaelab.training.schedule import LRSchedule, budget_spent
from vaelab.training.stepping import Stepping

__all__ = ["FinitenessGuard", "LRSchedule", "Stepping", "WeightEMA", "budget_spent"]
