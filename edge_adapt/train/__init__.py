"""Teaching the model to evaluate itself: on-policy labels (labels.py) and adapter training (trainer.py, needs
the `[train]` extra; imported lazily so the runtime never loads torch)."""

from edge_adapt.train.labels import LabelConfig, label, label_job, read_labels, targets

__all__ = ["LabelConfig", "label", "label_job", "read_labels", "targets"]
