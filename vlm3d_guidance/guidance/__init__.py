"""Guidance: one guided step composed from the geometry, render and critic stages."""

from .step import STAGES, RewardResult, StepRecord, normalized_update, reward_and_gradient, reward_of_mesh, timed  # noqa: F401
