"""Training-set indexes: `build_index`, `TrainingIndex`, clip-retrieval import, recipes."""

from memaudit.index.build import build_index, run_calibration
from memaudit.index.clip_retrieval import import_clip_retrieval
from memaudit.index.recipe import load_recipe
from memaudit.index.training_index import TrainingIndex

__all__ = ["TrainingIndex", "build_index", "import_clip_retrieval", "load_recipe",
           "run_calibration"]
