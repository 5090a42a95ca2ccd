"""The paper's Stack Overflow next-word model (``so_lstm``) and its token accuracy.

Zhu et al., "Diurnal or Nocturnal? Federated Learning of Multi-branch Networks from Periodically Shifting
Distributions", ICLR 2022; the reference's ``create_recurrent_dual_branch_model`` (google-research/federated,
periodic_distribution_shift/tasks/stackoverflow_nwp_tasks.py), which extends TFF's Stack Overflow baseline LSTM.

Sequence outputs in the multi-branch contract: ``forward(x [B, T]) -> ModelOutput(logits [B, K, V, T], features
[B, K * P])``. Classes sit on dimension 2 and time last, so that ``logits[:, k]`` is [B, V, T], the (N, C, d1) form
of ``F.cross_entropy``: the default task loss ``cross_entropy(logits[:, k], y, reduction="none", ignore_index=-1)``
gives the per-token loss [B, T], 0 on padding, and ``TrainContext.loss`` averages it over the tokens whose target
is >= 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from fedshift.core.params import ComponentParams
from fedshift.data.stackoverflow import SpecialTokens
from fedshift.nets.models import ARCHITECTURES, Architecture, ModelOutput, MultiBranchNet


class NextWordLSTMParams(ComponentParams):
    embedding_dim: int = Field(96, ge=1, description="word embedding width")
    hidden: int = Field(670, ge=1, description="LSTM units")


class LSTMTrunk(nn.Module):
    """Embedding -> one LSTM layer; also holds the output layer that every branch shares (a trunk parameter)."""

    def __init__(self, vocab: int, embedding_dim: int, hidden: int, projection_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.output = nn.Linear(projection_dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> LSTM states [B, T, hidden], what the branches read."""
        return self.lstm(self.embedding(ids))[0]


class NextWordLSTM(MultiBranchNet):
    """Embedding -> LSTM -> K linear projection branches (``heads.<k>``) -> one output layer shared by all branches
    (``trunk.output``). The clustering feature is every branch's projection averaged over the non-pad input
    positions, concatenated: [B, K * projection_dim]."""

    def __init__(self, vocab: int, branches: int, embedding_dim: int = 96, hidden: int = 670,
                 projection_dim: int = 96, sequence_length: int | None = None):
        nn.Module.__init__(self)  # MultiBranchNet's own heads map the feature to the classes; these do not
        self.trunk = LSTMTrunk(vocab, embedding_dim, hidden, projection_dim)
        self.heads = nn.ModuleList(nn.Linear(hidden, projection_dim) for _ in range(branches))
        self.feature_dim = branches * projection_dim
        self.num_classes = vocab
        self.input_shape = None if sequence_length is None else (sequence_length,)
        self.excluded_targets = SpecialTokens.for_output_size(vocab).excluded_from_accuracy

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [B, T], every branch's projection [B, K, T, P])."""
        # federation.build_mode stores every input as float32; token ids below 2^24 survive that exactly
        ids = x.long() if x.is_floating_point() else x
        states = self.trunk(ids)
        return ids, torch.stack([head(states) for head in self.heads], dim=1)

    def pooled(self, ids: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        """Each branch's projection averaged over the non-pad input positions, concatenated, [B, K * P] (the
        reference divides by count + 1e-7, so an all-pad row gives 0)."""
        mask = (ids != SpecialTokens.pad).to(projections.dtype)[:, None, :, None]
        mean = (projections * mask).sum(2) / (mask.sum(2) + 1e-7)
        return mean.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        ids, projections = self.project(x)
        return self.pooled(ids, projections)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        ids, projections = self.project(x)
        logits = self.trunk.output(projections)  # [B, K, T, V]
        return ModelOutput(logits.permute(0, 1, 3, 2), self.pooled(ids, projections))


@ARCHITECTURES.register
class StackOverflowLSTM(Architecture):
    """The paper's Stack Overflow next-word LSTM: embedding 96 -> LSTM 670 -> K 96-d projections -> shared output.

    Parameters:
        embedding_dim (96): word embedding width.
        hidden (670): LSTM units.
        feature_dim (model.feature_dim, 96): width of each branch's projection; the clustering feature is the K
            projections, masked-averaged over time and concatenated (model attribute ``feature_dim`` = K * 96).

    Inputs are token ids [B, T] (stackoverflow dataset); the output size is the scenario's number of classes, which
    must be the whole id range, vocab_size + 4 (set data.num_classes: a split without EOS targets would give
    fewer). Logits are [B, K, V, T]. PyTorch's default initialisation, not Keras's.
    """

    name = "so_lstm"
    Params = NextWordLSTMParams
    default_feature_dim = 96

    @classmethod
    def build(cls, input_shape, num_classes, branches, feature_dim, params) -> NextWordLSTM:
        if len(input_shape) != 1:
            raise ValueError(f"model 'so_lstm' reads token id sequences [N, T], got examples of shape "
                             f"{tuple(input_shape)}; use the stackoverflow dataset")
        return NextWordLSTM(num_classes, branches, params.embedding_dim, params.hidden,
                            feature_dim or cls.default_feature_dim, input_shape[0])


def token_counts(logits: torch.Tensor, targets: torch.Tensor, excluded: Sequence[int]) -> tuple[int, int]:
    """(correct, counted) next-token predictions of one branch: logits [B, V, T], targets [B, T]; positions whose
    target is in ``excluded`` are not counted (``NextWordLSTM.excluded_targets``: pad, OOV, EOS)."""
    counted = ~torch.isin(targets, torch.as_tensor(list(excluded), device=targets.device, dtype=targets.dtype))
    correct = (logits.argmax(1) == targets) & counted
    return int(correct.sum()), int(counted.sum())


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor, excluded: Sequence[int]) -> float:
    """Share of correct next-token predictions among the counted positions (``token_counts``); nan if none."""
    correct, counted = token_counts(logits, targets, excluded)
    return correct / counted if counted else float("nan")
