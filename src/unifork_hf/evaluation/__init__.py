"""Automatic evaluation: answers as text, a copy report for generated images, the Shapes judge for generated
images and exact-match scoring for answers."""

from .answers import answer_questions
from .copies import copy_report, nearest_training_distances
from .shapes_judge import detect, score_answers, score_image, score_images

__all__ = [
    "answer_questions",
    "copy_report",
    "detect",
    "nearest_training_distances",
    "score_answers",
    "score_image",
    "score_images",
]
