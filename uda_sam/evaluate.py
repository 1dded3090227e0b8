"""Deprecated alias, kept for one release: the scoring moved to :mod:`uda_sam.evaluation.scoring`, the command
(``main``, ``run_evaluate``) to :mod:`uda_sam.cli.evaluate`. Import from there.
"""

from uda_sam.cli.evaluate import main, run_evaluate
from uda_sam.evaluation.scoring import EvaluationError, evaluate_folder, label_space_hint

__all__ = ["EvaluationError", "evaluate_folder", "label_space_hint", "main", "run_evaluate"]
