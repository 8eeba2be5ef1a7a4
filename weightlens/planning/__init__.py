"""Plans before long work: ``plan(tv, method)`` prices a merge from headers alone (``docs/plan.md``).

``calibrate`` measures this machine's rates once and caches them; ``RECORDED`` holds estimates for GPUs.
"""

from weightlens.planning._core import Plan, plan
from weightlens.planning._rates import RECORDED, Rates, calibrate, fingerprint

__all__ = ["RECORDED", "Plan", "Rates", "calibrate", "fingerprint", "plan"]
