"""Age models: a timm backbone, optional attention pooling, gender/race heads and the age
method's head; `create_model(cfg)` builds one, `Ensemble` combines several."""

from trainer.models.ensemble import Ensemble
from trainer.models.model import AgeModel, create_model

__all__ = ["AgeModel", "Ensemble", "create_model"]
