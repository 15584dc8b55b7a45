"""Automatic evaluation: the Shapes judge for generated images and exact-match scoring for answers."""

from .shapes_judge import detect, score_answers, score_image, score_images

__all__ = ["detect", "score_answers", "score_image", "score_images"]
