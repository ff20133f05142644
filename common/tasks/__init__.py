"""The tasks fedpers personalizes: classify, generate, tag (named entities); one object each.

``get_task(cfg)`` picks the task from ``task.dataset`` (the config has checked that ``model.name`` fits):
tweets, news and file classify; shakespeare and text-file generate; wnut16 tags.
"""

from __future__ import annotations

from common.backbone import Backbone
from common.config import TAGGED_DATASETS, TEXT_DATASETS, Config
from common.tasks.base import Evaluation, Metrics, Task

__all__ = ["Backbone", "Evaluation", "Metrics", "Task", "get_backbone", "get_task"]


def get_task(cfg: Config) -> Task:
    """The task of ``cfg``."""
    dataset = cfg.task.dataset
    if dataset in TEXT_DATASETS:
        from common.tasks.generate import GenerateTask

        return GenerateTask(cfg)
    if dataset in TAGGED_DATASETS:
        from common.tasks.tag import TagTask

        return TagTask(cfg)
    from common.tasks.classify import ClassifyTask

    return ClassifyTask(cfg)


def get_backbone(cfg: Config) -> Backbone:
    """The per-process backbone of ``cfg``'s task (the frozen base is read-only, so it is shared)."""
    return get_task(cfg).backbone()
