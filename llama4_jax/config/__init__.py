"""Experiment configuration: the schema (schema.py) and loading it from YAML (loading.py)."""

from ..errors import ConfigError
from .loading import CURRICULUM_DIR, dump_resolved, load_curriculum, load_experiment
from .schema import Curriculum, Experiment, Mesh, Stage

__all__ = ["CURRICULUM_DIR", "ConfigError", "Curriculum", "Experiment", "Mesh", "Stage", "dump_resolved",
           "load_curriculum", "load_experiment"]
