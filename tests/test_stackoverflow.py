"""The Stack Overflow task: loader (tiny local parquet files), vocabulary and sequences, the so_lstm model, token
accuracy, and a scenario that builds its federation.

Ids with vocab_size V follow TFF's get_special_tokens: pad 0, words 1..V, OOV V + 1, BOS V + 2, EOS V + 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask  # noqa: E402
from fedshift.clients.erm import ERM  # noqa: E402

from fedshift.build import build_model  # noqa: E402
from fedshift.core.errors import DatasetUnavailable  # noqa: E402
from fedshift.data import DATASETS, build_federation  # noqa: E402
from fedshift.data.stackoverflow import SpecialTokens, encode, most_frequent, read_vocabulary
from fedshift.nets.lm import NextWordLSTM, token_accuracy, token_counts  # noqa: E402
from fedshift.nets.models import ARCHITECTURES
from fedshift.scenario import load_scenario  # noqa: E402
from fedshift.schema import ClientConfig

L = 5  # sequence length of the tiny files
# train split: (user, type, sentence). Word counts over every post: use 7, how 3, list 3, json 2, loads 2, sort 2,
# sorted 2, to 2, a 1, parse 1; so with V = 4 the vocabulary is use, how, list, json (ties alphabetical) -> ids 1..4,
# OOV 5, BOS 6, EOS 7. Counted over the questions alone it would start how, list, sort: the modes must share it.
TRAIN = [
    ("101", "question", "how to sort a list"),
    ("101", "answer", "use sorted list"),
    ("101", "answer", "use sorted"),
    ("202", "question", "how to parse json"),
    ("202", "answer", "use json loads"),
    ("202", "answer", "use loads"),
    ("303", "question", "sort list how"),
    ("303", "answer", "use use use"),
]
TEST = [("101", "question", "how to use json"), ("202", "answer", "use list")]
V = 4
USE, HOW, LIST, JSON, OOV, BOS, EOS = 1, 2, 3, 4, 5, 6, 7


def write_split(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    users, types, text = zip(*rows)
    pq.write_table(pa.table({"client_id": list(users), "tokens": list(text), "type": list(types)}), path)


@pytest.fixture(scope="module")
def so_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stackoverflow")
    write_split(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    write_split(root / "data" / "test-00000-of-00001.parquet", TEST)
    return root


def load(path: Path, **options):
    cls = DATASETS.get("stackoverflow")
    return cls(cls.Params(path=str(path), vocab_size=V, sequence_length=L, **options)).load(seed=0, test_fraction=0.5)


# ------------------------------------------------------------------------------------------ vocabulary, sequences


def test_special_ids_follow_tff_layout():
    s = SpecialTokens(10000)
    assert (s.pad, s.oov, s.bos, s.eos, s.size) == (0, 10001, 10002, 10003, 10004)
    assert SpecialTokens.for_output_size(10004) == s
    assert set(s.excluded_from_accuracy) == {-1, 0, 10001, 10003}


def test_encode_adds_bos_eos_pad_and_oov():
    words = ["a", "b", "c"]  # ids 1, 2, 3; OOV 4, BOS 5, EOS 6
    x, y = encode(["a c zzz", "a b c a b", "a b c a b c", ""], words, 3, L)
    assert x.dtype == np.int64 and y.dtype == np.int64 and x.shape == y.shape == (4, L)
    # shorter than L words: EOS ends it, pad (0 in inputs, -1 in targets) fills up
    assert x[0].tolist() == [5, 1, 3, 4, 6] and y[0].tolist() == [1, 3, 4, 6, -1]
    # exactly L words and longer: truncated to L words, no EOS (TFF adds it only below the maximum length)
    assert x[1].tolist() == [5, 1, 2, 3, 1] and y[1].tolist() == [1, 2, 3, 1, 2]
    assert x[2].tolist() == x[1].tolist() and y[2].tolist() == y[1].tolist()
    assert x[3].tolist() == [5, 6, 0, 0, 0] and y[3].tolist() == [6, -1, -1, -1, -1]  # an empty sentence


def test_targets_are_inputs_shifted_by_one():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(6)]
    sentences = [" ".join(rng.choice(words + ["rare"], size=rng.integers(0, 9))) for _ in range(50)]
    x, y = encode(sentences, words, 6, L)
    assert np.array_equal(x[:, 1:], np.where(y[:, :-1] == -1, 0, y[:, :-1]))
    assert (x[:, 0] == SpecialTokens(6).bos).all() and not (y == SpecialTokens(6).bos).any()


def test_vocabulary_most_frequent_ties_alphabetical():
    assert most_frequent([s for _, _, s in TRAIN], V) == ["use", "how", "list", "json"]


def test_vocabulary_file(tmp_path):
    (tmp_path / "vocab.txt").write_text("the 10\nto 5\n\nof 3\n")
    assert read_vocabulary(tmp_path / "vocab.txt", 2) == ["the", "to"]
    (tmp_path / "twice.txt").write_text("the\nto\nthe\n")
    with pytest.raises(DatasetUnavailable, match="repeats"):
        read_vocabulary(tmp_path / "twice.txt", 3)


# ------------------------------------------------------------------------------------------ the loader


def test_loader_questions(so_dir):
    data = load(so_dir, type="question")
    assert data.train_x.dtype == np.int64 and data.train_x.shape == (3, L)
    assert data.train_x[0].tolist() == [BOS, HOW, OOV, OOV, OOV]          # how to sort a (truncated)
    assert data.train_y[0].tolist() == [HOW, OOV, OOV, OOV, LIST]         # ... list: 5 words, no EOS
    assert data.train_x[2].tolist() == [BOS, OOV, LIST, HOW, EOS]          # sort list how
    assert data.train_y[2].tolist() == [OOV, LIST, HOW, EOS, -1]
    assert data.train_groups.tolist() == [0, 1, 2]                         # users 101, 202, 303
    assert data.test_x.tolist() == [[BOS, HOW, OOV, USE, JSON]] and data.test_y.tolist() == [[HOW, OOV, USE, JSON, EOS]]


def test_question_and_answer_modes_share_the_vocabulary(so_dir):
    everything, questions, answers = load(so_dir), load(so_dir, type="question"), load(so_dir, type="answer")
    is_question = np.array([t == "question" for _, t, _ in TRAIN])
    assert np.array_equal(questions.train_x, everything.train_x[is_question])
    assert np.array_equal(answers.train_x, everything.train_x[~is_question])
    assert np.array_equal(answers.train_y, everything.train_y[~is_question])
    assert answers.train_groups.tolist() == [0, 0, 1, 1, 2]
    assert answers.test_y.tolist() == [[USE, LIST, EOS, -1, -1]]


def test_vocabulary_file_relative_to_path(so_dir, tmp_path):
    root = tmp_path / "so"
    write_split(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    write_split(root / "data" / "test-00000-of-00001.parquet", TEST)
    (root / "vocab.txt").write_text("sort\nlist\n")
    data = load(root, type="question", vocab_path="vocab.txt")  # sort 1, list 2, the rest OOV
    assert data.train_x[2].tolist() == [BOS, 1, 2, OOV, EOS]


def test_without_test_split_each_user_keeps_training_sentences(tmp_path):
    root = tmp_path / "so"
    write_split(root / "data" / "train-00000-of-00001.parquet", TRAIN)
    data = load(root)
    assert len(data.train_y) + len(data.test_y) == len(TRAIN)
    assert len(data.test_y) > 0 and set(data.train_groups.tolist()) == {0, 1, 2}


def test_max_examples_keeps_whole_users(so_dir):
    data = load(so_dir, max_examples=3)  # every user has 3 sentences: exactly one user fits
    assert len(set(data.train_groups.tolist())) == 1 and len(data.train_y) == 3


def test_missing_files_say_what_to_do(tmp_path):
    cls = DATASETS.get("stackoverflow")
    with pytest.raises(DatasetUnavailable, match="set path"):
        cls(cls.Params()).load(0, 0.2)
    with pytest.raises(DatasetUnavailable, match="not a folder"):
        cls(cls.Params(path=str(tmp_path / "absent"))).load(0, 0.2)


# ------------------------------------------------------------------------------------------ the model


def tiny_model(branches: int = 2, vocab: int = V + 4) -> NextWordLSTM:
    torch.manual_seed(0)
    cls = ARCHITECTURES.get("so_lstm")
    return cls.build((L,), vocab, branches, 6, cls.Params(embedding_dim=8, hidden=12))


def test_model_shapes_and_parameter_names():
    model = tiny_model()
    x = torch.tensor([[BOS, HOW, USE, EOS, 0], [BOS, 1, 2, 3, 4]])
    out = model(x)
    assert out.logits.shape == (2, 2, V + 4, L) and out.features.shape == (2, 12)
    assert model.feature_dim == 12 and model.num_classes == V + 4 and model.num_branches == 2
    names = dict(model.named_parameters())
    assert {"trunk.embedding.weight", "trunk.output.weight", "trunk.output.bias"} <= set(names)
    assert names["trunk.embedding.weight"].shape == (V + 4, 8)
    assert names["trunk.lstm.weight_hh_l0"].shape == (4 * 12, 12)
    assert names["heads.0.weight"].shape == names["heads.1.weight"].shape == (6, 12)   # LSTM 12 -> projection 6
    assert names["trunk.output.weight"].shape == (V + 4, 6)
    assert not any(n.startswith("heads.") and "output" in n for n in names)
    assert "heads.1.weight" not in model.parameter_names([0]) and "trunk.output.weight" in model.parameter_names([0])
    # float ids, as the federation stores inputs, give the same output
    assert torch.equal(model(x.float()).logits, out.logits)


def test_output_layer_is_shared_and_branches_are_separate():
    model = tiny_model().eval()
    x = torch.tensor([[BOS, HOW, USE, EOS, 0]])
    with torch.no_grad():
        model.heads[1].load_state_dict(model.heads[0].state_dict())
    same = model(x).logits
    assert torch.allclose(same[:, 0], same[:, 1], atol=1e-6)  # equal projections -> equal logits: one output layer
    with torch.no_grad():
        model.heads[1].bias += 1
    moved = model(x).logits
    assert torch.allclose(moved[:, 0], same[:, 0], atol=1e-6) and not torch.allclose(moved[:, 1], same[:, 1], atol=1e-3)
    # training branch 0 gives the shared layer a gradient and leaves branch 1's projection alone
    F.cross_entropy(model(x).logits[:, 0], torch.tensor([[HOW, USE, EOS, -1, -1]]), ignore_index=-1).backward()
    assert model.trunk.output.weight.grad.abs().sum() > 0 and model.heads[0].weight.grad.abs().sum() > 0
    assert model.heads[1].weight.grad is None or not model.heads[1].weight.grad.any()


def test_feature_is_masked_mean_of_every_branch_projection():
    model = tiny_model().eval()
    padded = torch.tensor([[BOS, HOW, USE, 0, 0]])
    with torch.no_grad():
        states = model.trunk.lstm(model.trunk.embedding(padded[:, :3]))[0]  # the three non-pad positions
        expected = torch.cat([head(states).mean(1) for head in model.heads], dim=1)
        assert torch.allclose(model.features(padded), expected, atol=1e-6)
        assert torch.allclose(model(padded).features, expected, atol=1e-6)


def test_model_rejects_image_inputs():
    cls = ARCHITECTURES.get("so_lstm")
    with pytest.raises(ValueError, match="token id sequences"):
        cls.build((1, 8, 8), 10, 1, None, cls.Params())


def context(model, x, y) -> TrainContext:
    data = ClientData(x, y, torch.zeros(len(y), dtype=torch.long), model.num_classes)
    return TrainContext(model=model, data=data, task=TrainTask(branch=1), device=torch.device("cpu"), round=0, cid=0,
                        state={}, generator=torch.Generator().manual_seed(0), settings=ClientConfig(lr=0.5))


def test_per_token_loss_ignores_padding():
    model = tiny_model()
    x = torch.tensor([[BOS, HOW, USE, EOS, 0], [BOS, 1, 2, 3, 4]])
    y = torch.tensor([[HOW, USE, EOS, -1, -1], [1, 2, 3, 4, 1]])
    out = model(x)
    ctx = context(model, x, y)
    batch = Batch(x, y, ctx.data.domain)
    per_token = ctx.task.loss(out, batch)
    assert per_token.shape == (2, L) and (per_token[0, 3:] == 0).all()
    logp = out.logits[:, 1].log_softmax(1)  # branch 1, classes on dim 1
    nll = [-logp[b, int(y[b, t]), t] for b in range(2) for t in range(L) if y[b, t] >= 0]
    assert torch.allclose(ctx.loss(out, batch), torch.stack(nll).mean())


def test_token_accuracy_skips_pad_oov_and_eos():
    # targets: word 1, OOV, word 2, EOS, pad; predictions: right, right (OOV), wrong (3), right (EOS), anything
    y = torch.tensor([[1, OOV, 2, EOS, -1]])
    predicted = torch.tensor([1, OOV, 3, EOS, 0])
    logits = F.one_hot(predicted, V + 4).T[None].float()  # [1, V + 4, L]
    excluded = tiny_model().excluded_targets
    assert token_counts(logits, y, excluded) == (1, 2)   # counted: word 1 (right), word 2 (wrong)
    assert token_accuracy(logits, y, excluded) == 0.5    # counting OOV and EOS would give 3 / 4
    assert np.isnan(token_accuracy(logits, torch.tensor([[OOV, EOS, -1, -1, -1]]), excluded))


def test_one_erm_step_lowers_the_loss():
    model = tiny_model()
    x = torch.tensor([[BOS, HOW, USE, EOS, 0], [BOS, 1, 2, 3, 4], [BOS, JSON, JSON, EOS, 0]])
    y = torch.tensor([[HOW, USE, EOS, -1, -1], [1, 2, 3, 4, 1], [JSON, JSON, EOS, -1, -1]])
    ctx = context(model, x, y)
    ctx.optimizer = ctx.make_optimizer()
    batch = next(ctx.data.batches(3, ctx.generator))
    before = ERM(ERM.Params(), ctx.settings).update(batch, ctx)["loss"]
    with torch.no_grad():
        after = ctx.loss(model(x), batch)
    assert after < before


# ------------------------------------------------------------------------------------------ scenario


def scenario_file(tmp_path: Path, so_dir: Path) -> Path:
    so = {"name": "stackoverflow", "path": str(so_dir), "vocab_size": V, "sequence_length": L}
    raw = {
        "name": "so-tiny", "rounds": 2, "clients_per_round": 2,
        "modes": {"day": {"dataset": {**so, "type": "question"}}, "night": {"dataset": {**so, "type": "answer"}}},
        "data": {"dataset": so, "clients_per_mode": 3, "partition": {"kind": "natural", "min_examples": 1},
                 "num_classes": V + 4},
        "model": {"architecture": "so_lstm", "embedding_dim": 8, "hidden": 12, "feature_dim": 6},
        "client": {"strategy": "erm", "lr": 0.1, "batch_size": 2},
        "backend": {"device": "cpu"}, "output": {"tensorboard": False},
    }
    path = tmp_path / "so.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_scenario_builds_a_natural_federation(so_dir, tmp_path):
    scenario = load_scenario(str(scenario_file(tmp_path, so_dir)))
    fed = build_federation(scenario)
    assert fed.num_classes == V + 4 and fed.input_shape == (L,)
    assert fed.num_clients == 6 and fed.client_mode.tolist() == [0, 0, 0, 1, 1, 1]
    # a day client is one user's questions (one each), a night client one user's answers (2, 2, 1)
    day_sizes = sorted(fed.client_size(c) for c in range(3))
    night_sizes = sorted(fed.client_size(c) for c in range(3, 6))
    assert day_sizes == [1, 1, 1] and night_sizes == [1, 2, 2]
    # a mode without labels, transform or label_map passes the token targets through unchanged
    questions = load(so_dir, type="question")
    day_rows = slice(0, int(fed.offsets[3]))
    assert sorted(map(tuple, fed.train_y[day_rows].tolist())) == sorted(map(tuple, questions.train_y.tolist()))
    assert sorted(map(tuple, fed.train_x[day_rows].astype(np.int64).tolist())) == \
        sorted(map(tuple, questions.train_x.tolist()))
    assert fed.test["night"][1].tolist() == [[USE, LIST, EOS, -1, -1]]
    model = build_model(scenario, fed.input_shape, fed.num_classes)
    assert isinstance(model, NextWordLSTM) and model.num_branches == 1 and model.feature_dim == 6


def test_builtin_scenario_validates_offline():
    scenario = load_scenario("stackoverflow")
    assert scenario.model.architecture == "so_lstm" and scenario.data.num_classes == 10004
    assert [scenario.dataset_of_mode(m).type for m in scenario.mode_names] == ["question", "answer"]
