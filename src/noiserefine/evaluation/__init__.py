"""Grading generated images: the shapes16 judges, benchmark metrics and folder evaluation."""

from noiserefine.evaluation.folder import evaluate_folder
from noiserefine.evaluation.judge import Judge, load_judge, load_judges, train_judge
from noiserefine.evaluation.metrics import frechet_distance, reference_features, score_images

__all__ = [
    "Judge",
    "evaluate_folder",
    "frechet_distance",
    "load_judge",
    "load_judges",
    "reference_features",
    "score_images",
    "train_judge",
]
