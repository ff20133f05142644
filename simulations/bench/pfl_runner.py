"""The sim-speed workloads run through Apple's pfl-research (``pfl``) instead of Flower.

The work equals fedpers' with ``dp.enabled = false`` and ``personalization.mode = fedavg``: per round
each sampled client trains ``train.local-epochs`` epochs of SGD with momentum (LoRA at ``train.lr-lora``,
head at ``train.lr-head``, two parameter groups) over freshly shuffled batches of its features (the task's
own ``features``: the same frozen prefix and, for the head-only model, the same pooling), and with
``client.report-before-after`` it evaluates on its test split before and after; the server averages the
LoRA and head tensors and applies ``fed.server-lr`` / ``fed.server-momentum`` as a central SGD step.
Clients are evaluated every ``fed.evaluate-every`` rounds and after the last. A client's data and
features are loaded when it is first sampled (or evaluated) and kept in memory, inside the timed region.

Two workloads (simulations.bench.sim_speed): every client every round, example-weighted average
(``WeightByDatapoints``); or cross-device, ``fed.fraction-train`` q < 1 with central user-level DP,
which pfl runs as ``CentrallyAppliedPrivacyMechanism(GaussianMechanism(S, z))``: each user's update
clipped to S = ``dp.user-clipping-norm``, the sum noised with z·S (z = ``dp.user-noise-multiplier``)
and divided by the cohort, the users unweighted. pfl's cohorts are fixed-size, round(q·N) users per
round, drawn by its ``MinimizeReuseUserSampler`` over a seeded permutation of the users (pfl's recommended
sampler; fedpers draws Poisson cohorts of expected size q·N and divides by q·N): the same expected work.

Multi-core: pfl's docs ("Fast distributed simulations") run one worker process per core with
``torchrun --standalone --nnodes=1 --nproc_per_node=W``; the cohort is sharded across the workers, their
statistics are all-reduced over torch.distributed (gloo on the CPU, loopback), and every worker applies
the same update (the central noise is drawn from the round's shared seed). :func:`main` is that entry
point (``python -m torch.distributed.run ... -m simulations.bench.pfl_runner '<json>'``); the central
evaluation after a round is sharded the same way (worker r evaluates the clients i with i mod W = r)
and all-reduced. With one process (no torchrun) the same code runs unsharded.

Left different from fedpers: no update checks (key set, shapes, ``fed.max-update-norm``) and no
encrypted state file per client and round; the weighted average is a float32 sum of model differences
rather than a float64 sum of tensors (equal up to rounding); the shuffling is seeded once per run, not
per client and round. Importing pfl's PyTorch support switches ``multiprocessing`` to "forkserver" in
this process, and under torchrun joins the process group.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (via common.model)

import json
import sys
import time
from collections.abc import Mapping, Sequence
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
from pfl.internal.ops import pytorch_ops
from pfl.metrics import Metrics, StringMetricName, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.postprocessor.base import Postprocessor
from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism
from pfl.version import __version__ as pfl_version
from torch import nn
from torch.utils.data import TensorDataset

from common.config import Config
from common.errors import ConfigError
from common.tasks import Task, get_task

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
    """PyTorchModel whose per-user evaluation uses the user's test split (fedpers' acc-before/after).

    ``report = False`` (``client.report-before-after = false``): a training user is not evaluated.
    """

    report = True

    def evaluate(
        self, dataset: Any, name_formatting_fn: Any = StringMetricName, eval_params: Any = None
    ) -> Any:
        """pfl's evaluation, on ``dataset``'s test split where it carries one."""
        if TEST in dataset.metadata and not self.report:
            return Metrics()
        return super().evaluate(dataset.metadata.get(TEST, dataset), name_formatting_fn, eval_params)


class _Users:
    """Each user's pfl datasets, made when the user is first needed and then kept."""

    def __init__(self, cfg: Config, task: Task, num_clients: int) -> None:
        self.cfg, self.task, self.num_clients = cfg, task, num_clients
        self.backbone = task.backbone()
        self.data: dict[int, Any] = {}
        self.train: dict[int, PyTorchDataDataset] = {}
        self.test: dict[int, Dataset] = {}

    def _features(self, uid: int, split: str) -> Tensors:
        if uid not in self.data:
            self.data[uid] = self.task.load(uid, self.num_clients)
        f = self.task.features(self.backbone, self.data[uid], split)
        return f.hidden, f.mask, f.labels

    def test_set(self, uid: int) -> Dataset:
        """User ``uid``'s test split."""
        if uid not in self.test:
            self.test[uid] = Dataset(self._features(uid, "test"))
        return self.test[uid]

    def __call__(self, uid: int) -> PyTorchDataDataset:
        """User ``uid``'s training dataset (shuffled batches) carrying its test split."""
        if uid not in self.train:
            train = TensorDataset(*self._features(uid, "train"))
            meta = {TEST: self.test_set(uid)}
            self.train[uid] = PyTorchDataDataset(train, user_id=uid, metadata=meta, shuffle=True)
        return self.train[uid]


class _RoundEnd(TrainingProcessCallback):
    """After each round: on schedule, evaluate every client (sharded over the workers); time the round."""

    def __init__(self, users: _Users, rounds: int, every: int, eval_params: NNEvalHyperParams) -> None:
        self.users, self.rounds, self.every, self.eval_params = users, rounds, every, eval_params
        self.done = 0
        self.last = time.perf_counter()
        self.first_end = 0.0  # perf_counter at the end of round 1
        self.ends: list[float] = []  # time.time() at each round's end
        self.seconds: list[float] = []
        self.accs: list[list[float]] = []

    def after_central_iteration(
        self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
    ) -> tuple[bool, Metrics]:
        self.done += 1
        out = Metrics()
        if self.done == self.rounds or self.done % self.every == 0:
            accs = self._evaluate(model)
            self.accs.append(accs)
            out = Metrics([(StringMetricName("clients | accuracy"), Weighted(sum(accs), len(accs)))])
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.first_end, self.last = self.first_end or now, now
        self.ends.append(time.time())
        return False, out

    def _evaluate(self, model: Any) -> list[float]:
        """Every client's test accuracy: this worker's share, all-reduced."""
        dist = pytorch_ops.distributed
        n = self.users.num_clients
        accs = torch.zeros(n, dtype=torch.float64)
        for uid in range(dist.global_rank, n, dist.world_size):
            metrics = model.evaluate(self.users.test_set(uid), StringMetricName, self.eval_params)
            accs[uid] = float(metrics["accuracy"].overall_value)
        return [float(a) for a in dist.all_reduce([accs])[0]]


def _sampler(cfg: Config, num_clients: int) -> tuple[MinimizeReuseUserSampler, int]:
    """pfl's recommended sampler over the users (a seeded permutation) and the fixed cohort size."""
    q = cfg.fed.fraction_train
    if q >= 1:
        return MinimizeReuseUserSampler(list(range(num_clients))), num_clients
    order = np.random.default_rng(cfg.task.seed).permutation(num_clients).tolist()
    return MinimizeReuseUserSampler(order), max(1, round(q * num_clients))


def _postprocessors(cfg: Config) -> list[Postprocessor]:
    """Example weighting, or central user-level DP (clip to S, Gaussian z·S on the sum, users unweighted)."""
    d = cfg.dp
    if not d.user_level:
        return [WeightByDatapoints()]
    mechanism = GaussianMechanism(d.user_clipping_norm, d.user_noise_multiplier)
    return [CentrallyAppliedPrivacyMechanism(mechanism)]


def check_pfl_config(cfg: Config, num_clients: int) -> None:
    """Refuse what this runner does not reproduce."""
    d = cfg.dp
    if d.enabled or cfg.personalization.mode != "fedavg":
        raise ConfigError("run_pfl runs the non-private fedavg workload: set dp.enabled = false and fedavg")
    if d.user_level and (d.user_clipping != "fixed" or d.user_epsilon > 0 or d.user_virtual_cohort):
        raise ConfigError(
            "run_pfl's user-level DP is a fixed S and z on the simulated cohort: dp.user-clipping = fixed, "
            "dp.user-epsilon = 0, no dp.user-virtual-cohort"
        )
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")


def _local_optimizer(net: nn.Module, cfg: Config) -> Any:
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


def _model(cfg: Config, users: _Users) -> _TestSplitModel:
    """pfl's model around a fresh fedpers model; the central optimizer is fed.server-lr / -momentum."""
    net = users.backbone.new_model()
    classifier = _Classifier(net)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    central = torch.optim.SGD(trainable, lr=cfg.fed.server_lr, momentum=cfg.fed.server_momentum)
    model = _TestSplitModel(classifier, _local_optimizer(net, cfg), central)
    model.report = cfg.client.report_before_after
    return model


def run_pfl(overrides: Mapping[str, Any], num_clients: int, threads: int = 1) -> dict[str, Any]:
    """Run cfg.fed.num-rounds rounds of federated averaging with pfl over num_clients clients.

    In a torchrun worker the cohort and the evaluation are sharded over the workers. Returns timings
    (``round-ends`` in epoch seconds), this worker's rank and the final mean accuracy.
    """
    start = time.perf_counter()
    cfg = Config.from_run_config(dict(overrides))
    check_pfl_config(cfg, num_clients)
    torch.set_num_threads(threads)
    np.random.seed(cfg.model.seed)  # pfl's cohort seeds: equal on every worker
    torch.manual_seed(cfg.model.seed)  # the shuffling of the training batches
    users = _Users(cfg, get_task(cfg), num_clients)
    model = _model(cfg, users)
    sampler, cohort = _sampler(cfg, num_clients)
    federated = FederatedDataset(users, sampler)
    backend = SimulatedBackend(
        training_data=federated, val_data=federated, postprocessors=_postprocessors(cfg)
    )
    eval_params = NNEvalHyperParams(local_batch_size=EVAL_BATCH)
    round_end = _RoundEnd(users, cfg.fed.num_rounds, cfg.fed.evaluate_every, eval_params)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=cfg.fed.num_rounds,
            evaluation_frequency=1,
            train_cohort_size=cohort,
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
    dist = pytorch_ops.distributed
    return {
        "framework": f"pfl {pfl_version}",
        "mode": cfg.personalization.mode,
        "clients": num_clients,
        "cohort": cohort,
        "workers": dist.world_size,
        "rank": dist.global_rank,
        "rounds": len(round_end.seconds),
        "seconds": time.perf_counter() - start,
        "cold-start-seconds": round_end.first_end - start,
        "round-seconds": round_end.seconds,
        "round-ends": round_end.ends,
        "acc-mean": float(np.mean(round_end.accs[-1])),
        "acc-per-evaluation": [float(np.mean(a)) for a in round_end.accs],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """One pfl worker: ``argv[1]`` is JSON {overrides, clients, threads}; rank 0 prints ``RESULT <json>``.

    ``entered`` (epoch seconds) is taken here, after this module's imports (torch, transformers, pfl and,
    under torchrun, joining the process group).
    """
    args = json.loads((argv if argv is not None else sys.argv)[1])
    entered = time.time()
    result = run_pfl(args["overrides"], int(args["clients"]), threads=int(args.get("threads", 1)))
    result.update({"entered": entered, "done": time.time()})
    if torch.distributed.is_initialized():  # an orderly end: no worker leaves while another still talks
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if result["rank"] == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker whose work is done and reported
        # Skip the interpreter's teardown: there a worker's C++ threads sometimes abort the process
        # ("terminate called without an active exception", SIGABRT) after a clean end, which torchrun
        # would report as the whole run failing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
