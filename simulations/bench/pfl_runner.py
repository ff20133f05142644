"""The benchmark workload run through Apple's pfl-research (``pfl``) instead of Flower.

The work equals ``simulations.sequential`` with ``dp.enabled = false`` and ``personalization.mode =
fedavg``: per round every client evaluates the global model on its test split, trains
``train.local-epochs`` epochs of SGD with momentum (LoRA at ``train.lr-lora``, head at ``train.lr-head``,
two parameter groups) over freshly shuffled batches of its frozen-prefix features, and evaluates again;
the server takes the example-weighted average of the LoRA and head tensors; the new global model is then
evaluated on every client's test split. The backbone is built and every client's features are extracted
inside the timed region, uncached, so a run never profits from an earlier one in the same process.

pfl pieces: ``PyTorchModel`` (its per-user evaluation is pointed at the user's test split, which pfl
would otherwise take from the training data), ``PyTorchDataDataset`` (shuffled batches) per user in a
``FederatedDataset`` with ``MinimizeReuseUserSampler`` (cohort = all clients), ``FederatedAveraging``,
``SimulatedBackend`` with ``WeightByDatapoints``, a central SGD with lr 1 (plain averaging), and a
callback for the post-aggregation evaluation.

Left different from fedpers: no update checks (key set, shapes, ``fed.max-update-norm``) and no
encrypted state file per client and round; the average is a float32 sum of model differences rather than
a float64 sum of tensors (equal up to rounding); the shuffling is seeded once per run, not per client
and round. Importing pfl's PyTorch support switches ``multiprocessing`` to "forkserver" in this process.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (via common.model)

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.pytorch import PyTorchDataDataset
from pfl.data.sampling import MinimizeReuseUserSampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, StringMetricName, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.version import __version__ as pfl_version
from torch import nn
from torch.utils.data import TensorDataset

from common.config import Config
from common.data import label_names, load_client_data
from common.errors import ConfigError
from common.features import prefix_features
from common.model import EncoderBackbone as Backbone
from common.model import build_backbone

EVAL_BATCH = 128  # client.training.evaluate's batch size
TEST = "test"  # metadata key of a user's test split
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Classifier(nn.Module):
    """A PersonalModel with the per-batch ``loss`` and ``metrics`` that pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits; the batch is trimmed to its longest sequence first (as ``Features.batch`` does)."""
        width = max(int(mask.sum(1).max()), 1)
        return self.net(hidden[:, :width], mask[:, :width])

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of a training batch."""
        self.train()
        return F.cross_entropy(self(hidden, mask), labels)

    @torch.no_grad()
    def metrics(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Accuracy and cross-entropy of an evaluation batch, weighted by its size."""
        self.eval()
        logits = self(hidden, mask)
        n = len(labels)
        loss = float(F.cross_entropy(logits, labels, reduction="sum"))
        return {"accuracy": Weighted(int((logits.argmax(-1) == labels).sum()), n), "loss": Weighted(loss, n)}


class _TestSplitModel(PyTorchModel):
    """PyTorchModel whose per-user evaluation uses the user's test split (fedpers' acc-before/after)."""

    def evaluate(
        self, dataset: Any, name_formatting_fn: Any = StringMetricName, eval_params: Any = None
    ) -> Any:
        """pfl's evaluation, on ``dataset``'s test split where it carries one."""
        return super().evaluate(dataset.metadata.get(TEST, dataset), name_formatting_fn, eval_params)


class _RoundEnd(TrainingProcessCallback):
    """After each round: evaluate the new global model on every client's test split; time the round."""

    def __init__(self, tests: Sequence[Dataset], eval_params: NNEvalHyperParams) -> None:
        self.tests, self.eval_params = tests, eval_params
        self.last = time.perf_counter()
        self.ends: list[float] = []
        self.seconds: list[float] = []
        self.accs: list[list[float]] = []

    def after_central_iteration(
        self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
    ) -> tuple[bool, Metrics]:
        accs = [
            float(model.evaluate(ds, StringMetricName, self.eval_params)["accuracy"].overall_value)
            for ds in self.tests
        ]
        now = time.perf_counter()
        self.ends.append(now)
        self.seconds.append(now - self.last)
        self.last = now
        self.accs.append(accs)
        return False, Metrics([(StringMetricName("clients | accuracy"), Weighted(sum(accs), len(accs)))])


def _features(backbone: Backbone, texts: Sequence[str], labels: np.ndarray, max_length: int) -> Tensors:
    """(hidden, mask, labels) after the frozen prefix, as ``common.features.encode`` computes them."""
    hidden, mask, order = prefix_features(backbone, texts, max_length)
    return hidden, mask, torch.tensor(np.asarray(labels, dtype=np.int64)[order])


def _local_optimizer(net: nn.Module, cfg: Config) -> Callable[..., torch.optim.Optimizer]:
    """pfl's ``local_optimizer_create``: fedpers' optimizer, LoRA at ``lr`` and the head at lr-head."""

    def create(params: Any, lr: float) -> torch.optim.Optimizer:
        del params  # pfl passes every module parameter; the groups below take the trainable ones
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not n.startswith("head.")], "lr": lr},
            {"params": [p for n, p in named if n.startswith("head.")], "lr": cfg.train.lr_head},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.train.optimizer == "adam":
            return torch.optim.Adam(groups)
        return torch.optim.SGD(groups, momentum=cfg.train.momentum)

    return create


def run_pfl(overrides: Mapping[str, Any], num_clients: int, threads: int = 1) -> dict[str, Any]:
    """Run cfg.fed.num-rounds rounds of federated averaging with pfl over num_clients clients.

    Every client trains and is evaluated in every round; returns timings and the final mean accuracy.
    """
    start = time.perf_counter()
    cfg = Config.from_run_config(dict(overrides))
    if cfg.dp.enabled or cfg.personalization.mode != "fedavg":
        raise ConfigError("run_pfl runs the non-private fedavg workload: set dp.enabled = false and fedavg")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    torch.set_num_threads(threads)
    backbone = build_backbone(cfg, len(label_names(cfg.task)))
    net = backbone.new_model()
    torch.manual_seed(cfg.model.seed)  # the shuffling of the training batches
    trains, tests = [], []
    for i in range(num_clients):
        data = load_client_data(cfg.task, i, num_clients)
        test = Dataset(_features(backbone, data.test_texts, data.test_labels, cfg.task.max_length))
        train = _features(backbone, data.train_texts, data.train_labels, cfg.task.max_length)
        user = PyTorchDataDataset(TensorDataset(*train), user_id=i, metadata={TEST: test}, shuffle=True)
        trains.append(user)
        tests.append(test)
    classifier = _Classifier(net)
    central = torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=1.0)
    model = _TestSplitModel(classifier, _local_optimizer(net, cfg), central)
    users = FederatedDataset(lambda uid: trains[uid], MinimizeReuseUserSampler(list(range(num_clients))))
    backend = SimulatedBackend(training_data=users, val_data=users, postprocessors=[WeightByDatapoints()])
    eval_params = NNEvalHyperParams(local_batch_size=EVAL_BATCH)
    round_end = _RoundEnd(tests, eval_params)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=cfg.fed.num_rounds,
            evaluation_frequency=1,
            train_cohort_size=num_clients,
            val_cohort_size=None,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_batch_size=cfg.train.batch_size,
            local_num_epochs=cfg.train.local_epochs,
            local_learning_rate=cfg.train.lr_lora,
        ),
        model_eval_params=eval_params,
        callbacks=[round_end],
        send_metrics_to_platform=False,
    )
    return {
        "framework": f"pfl {pfl_version}",
        "mode": cfg.personalization.mode,
        "clients": num_clients,
        "rounds": len(round_end.seconds),
        "seconds": time.perf_counter() - start,
        "cold-start-seconds": round_end.ends[0] - start,
        "round-seconds": round_end.seconds,
        "acc-mean": float(np.mean(round_end.accs[-1])),
        "acc-per-round": [float(np.mean(a)) for a in round_end.accs],
    }
