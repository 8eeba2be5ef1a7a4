"""Why a merge lost a task: per task and block, from the weights alone (``docs/diagnosis.md``).

``diagnose(tv, merged)`` returns a :class:`Diagnosis`: what share of each task's update the merge keeps
per block (SAR against the merged update), the energy it loses, which other task crowds the lost
directions, the sign story (mass the merge opposes, and who won it), one predicted cost per task and
block with a ranking of blocks, and pre-merge checks (a fine-tune of another base, a dominating task,
LoRA-like updates, sign conflicts far above chance) that explain failures before any merge
(``diagnose(tv, None)``). With ``evaluate=``, restoration tests measure what restoring a block to a task's
own weights gives back (``measured_gain``, ``cost_to_others``, the Spearman of prediction and measurement).
"""

from weightlens.diagnosis._checks import DOMINANT_RATIO, FOREIGN_RATIO, FOREIGN_UNDO, LOW_RANK, SIGN_EXCESS
from weightlens.diagnosis._core import diagnose
from weightlens.diagnosis._options import DiagnoseOptions
from weightlens.diagnosis._restore import RestorationError
from weightlens.diagnosis._result import Diagnosis, Suggestion

__all__ = ["DOMINANT_RATIO", "FOREIGN_RATIO", "FOREIGN_UNDO", "LOW_RANK", "SIGN_EXCESS", "DiagnoseOptions", "Diagnosis",
           "RestorationError", "Suggestion", "diagnose"]
