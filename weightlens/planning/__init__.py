"""Plans before long work: ``plan(tv, method)`` prices a merge from headers alone (``docs/plan.md``).

``calibrate`` measures this machine's rates once and caches them; ``RECORDED`` holds estimates for GPUs.
"""

from weightlens.planning._core import OPTIMISTIC, Plan, long_run_plan, plan
from weightlens.planning._rates import RECORDED, Rates, calibrate, fingerprint

__all__ = ["OPTIMISTIC", "RECORDED", "Plan", "long_run_plan", "Rates", "calibrate", "fingerprint", "plan"]
