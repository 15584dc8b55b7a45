"""Automatic evaluation: answers as text, the Shapes judge for generated images and exact-match scoring for
answers."""

from .answers import answer_questions
from .shapes_judge import detect, score_answers, score_image, score_images

__all__ = ["answer_questions", "detect", "score_answers", "score_image", "score_images"]
