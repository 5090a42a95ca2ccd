"""Client strategies that change what trains: LP-FT, Head2Toe, PAINT, LoRA, adapters, the EMA teacher, beta-VAE,
and ``model.pretrained``. Each test is the reference document's section (e) check or a stronger one."""

import copy
import math
import re
import types

import pytest
import torch
from fedshift.clients import CLIENT_STRATEGIES, ClientData, TrainContext, TrainTask
from fedshift.clients.beta_vae import BetaVAEParams, beta_vae_loss, capacity, kl_divergence, reconstruction_loss
from fedshift.clients.ema_teacher import STATE, ema_update_, prob_pseudo_mixup, unlabelled_loss
from fedshift.clients.head2toe import group_lasso_penalty, group_soft_threshold_, pool_block, select_features
from fedshift.clients.paint import interpolate
from fedshift.clients.peft import LoRAConv2d, LoRALinear, peft_parameter_names
from fedshift.strategies.base import ClientInstruction
from torch import nn

from fedshift import load_scenario
from fedshift.core.errors import ScenarioError
from fedshift.core.tensors import trunk_blocks
from fedshift.nets.models import ARCHITECTURES
from fedshift.runtime.flower.transport import unpack_instructions
from fedshift.runtime.loop import Simulation
from fedshift.runtime.worker import World
from fedshift.schema import ClientConfig

SHAPE = (1, 8, 8)


def build(arch="mlp", branches=1, shape=SHAPE, seed=0, feature_dim=None, **arch_params):
    torch.manual_seed(seed)
    a = ARCHITECTURES.get(arch)
    return a.build(shape, 10, branches, feature_dim, a.Params(**arch_params))


def trainer(name, settings=None, **params):
    cls = CLIENT_STRATEGIES.get(name)
    return cls(cls.Params(**params), settings or ClientConfig(strategy=name, batch_size=10, lr=0.1))


def context(model, tr, n=40, shape=SHAPE, round=0, state=None, seed=0, task=None, unlabelled=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    y[torch.rand(n, generator=g) < unlabelled] = -1
    return TrainContext(model=model, data=ClientData(x, y, torch.zeros(n, dtype=torch.long), 10), task=task or TrainTask(),
                        device=torch.device("cpu"), round=round, cid=0, state={} if state is None else state,
                        generator=torch.Generator().manual_seed(seed + 1), settings=tr.settings)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario(strategy, *overrides):
    return load_scenario("default", ["rounds=2", "clients_per_round=2", "data.clients_per_mode=3",
                                     "output.tensorboard=false", "output.save_model=false", "client.max_steps=2",
                                     f"client.strategy={strategy}", *overrides])


# ---------------------------------------------------------------------------------------------------- PAINT


def test_interpolate_endpoints_are_exact_and_midpoint_is_the_mean():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(50, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(50, generator=g), "n": torch.tensor(7)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.equal(interpolate(a, b, 0.5)["w"], (a["w"] + b["w"]) / 2)
    # integer counters are not interpolated as floats: they take the nearer endpoint, keeping their dtype
    assert interpolate(a, b, 0.3)["n"].item() == 3 and interpolate(a, b, 0.7)["n"].item() == 7
    assert interpolate(a, b, 0.7)["n"].dtype == torch.int64


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.25])
def test_paint_returns_received_finetuned_or_between(alpha):
    start = build()
    # the fine-tuned endpoint, computed independently: ERM steps with the heads frozen, same data and seeds
    ft = copy.deepcopy(start)
    erm = trainer("erm")
    frozen_head = TrainTask(trainable=[n for n, _ in ft.named_parameters() if not n.startswith("heads.")])
    erm.train(context(ft, erm, task=frozen_head))
    model = copy.deepcopy(start)
    tr = trainer("paint", alpha=alpha)
    tr.train(context(model, tr))
    got, a, b = model.state_dict(), start.state_dict(), ft.state_dict()
    for k in got:
        if k.startswith("heads."):
            assert torch.equal(got[k], a[k]), k  # the head is frozen: bitwise as received
        elif alpha == 0:
            assert torch.equal(got[k], a[k]), k
        elif alpha == 1:
            assert torch.equal(got[k], b[k]), k
        else:
            assert torch.allclose(got[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-7), k
    assert not torch.equal(a["trunk.1.weight"], b["trunk.1.weight"])  # the endpoints do differ


# ---------------------------------------------------------------------------------------------------- LoRA, adapter


@pytest.mark.parametrize("name", ["lora", "adapter"])
@pytest.mark.parametrize("arch,params", [("mlp", {}), ("emnist_cnn", {"channels": [4, 8]}),
                                         ("resnet18_gn", {"width": 8})])
def test_peft_model_equals_original_at_init(name, arch, params):
    original = build(arch, **params)
    wrapped = copy.deepcopy(original)
    trainer(name).prepare_model(wrapped)
    assert peft_parameter_names(wrapped)
    x = torch.rand(6, *SHAPE)
    original.eval(), wrapped.eval()
    with torch.no_grad():
        a, b = original(x), wrapped(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_peft_trains_only_its_modules_and_heads_frozen_weights_bit_identical(name):
    model = build("emnist_cnn", channels=[4, 8])
    tr = trainer(name)
    tr.prepare_model(model)
    shared = tr.shared_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(shared) == sorted(trainable)
    assert {n for n in shared if not n.startswith("heads.")} == set(peft_parameter_names(model))
    before = snapshot(model)
    tr.train(context(model, tr))
    after = model.state_dict()
    frozen = [k for k in after if k not in shared]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert all(not torch.equal(after[k], before[k]) for k in shared)  # every shared parameter trained


def test_lora_parameter_count_and_merge():
    lin = LoRALinear(nn.Linear(12, 7), r=3, alpha=6.0)
    conv = LoRAConv2d(nn.Conv2d(4, 5, 3, stride=2, padding=1), r=2, alpha=4.0)
    assert lin.lora_A.numel() + lin.lora_B.numel() == 3 * (12 + 7)
    assert conv.lora_A.numel() + conv.lora_B.numel() == 2 * (4 * 3 * 3 + 5)
    g = torch.Generator().manual_seed(0)
    for m in (lin, conv):
        m.eval()
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    x = torch.randn(5, 12, generator=g)
    assert torch.allclose(lin(x), nn.functional.linear(x, lin.merged_weight(), lin.base.bias), atol=1e-5)
    xc = torch.randn(2, 4, 9, 9, generator=g)
    merged = nn.functional.conv2d(xc, conv.merged_weight(), conv.base.bias, stride=2, padding=1)
    assert torch.allclose(conv(xc), merged, atol=1e-5)


def test_trunk_blocks_find_activations_and_residual_blocks_with_widths():
    assert trunk_blocks(build("mlp", hidden=[16, 12]).trunk) == [("2", 16), ("4", 12), ("6", 64)]
    assert trunk_blocks(build("emnist_cnn", channels=[4, 8]).trunk) == [("1", 4), ("3", 8), ("8", 128)]
    res = trunk_blocks(build("resnet18_gn", width=8).trunk)
    # stem activation, 8 residual blocks, the final norm's activation, then that of the Linear to the 512-wide feature
    assert res[0] == ("3", 8) and [w for _, w in res[1:]] == [8, 8, 16, 16, 32, 32, 64, 64, 64, 512]


def first_round_instructions(tmp_path, sc, monkeypatch):
    """The engine's round-0 messages, captured at the grid (no Ray): arrays as the clients receive them."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):  # set by Flower's ServerApp runtime, which is not running here
        monkeypatch.setattr(TaskIdentity, key, 1)
    from fedshift.runtime.flower.executor import FlowerExecutor

    sim = Simulation(sc, out=tmp_path / "run")

    class Captured(Exception):
        pass

    class Grid:
        def get_node_ids(self):
            return [1, 2]

        def send_and_receive(self, messages, **kwargs):
            if all(m.metadata.message_type == "query" for m in messages):  # the engine's warm-up: all started
                return [types.SimpleNamespace(has_error=lambda: False) for _ in messages]
            self.messages = messages
            raise Captured

    grid = Grid()
    with pytest.raises(Captured):
        sim.serve_with(FlowerExecutor(grid))
    return sim, [task.instruction for m in grid.messages for task in unpack_instructions(m.content).tasks]


@pytest.mark.parametrize("name", ["lora", "adapter", "head2toe"])
def test_only_shared_names_travel_through_the_engine_and_a_world(tmp_path, monkeypatch, name):
    sc = scenario(name)
    sim, sent = first_round_instructions(tmp_path, sc, monkeypatch)
    shared = set(sim.world.trainer.shared_names(sim.world.model))
    assert len(sent) == 2 and all(set(ins.arrays) == shared for ins in sent)
    world = World.build(sc)
    frozen = {k: v.clone() for k, v in world.model.state_dict().items() if k not in shared}
    result, _ = world.run_client(sent[0], 0, {})
    assert set(result.arrays) == shared
    assert all(not torch.equal(result.arrays[k], sent[0].arrays[k]) for k in shared if k.endswith("weight"))
    assert all(torch.equal(world.model.state_dict()[k], v) for k, v in frozen.items())


# ---------------------------------------------------------------------------------------------------- LP-FT


def test_lpft_probe_rounds_train_only_the_task_branch_head_then_everything():
    tr = trainer("lpft", probe_rounds=2)
    model = build(branches=2, seed=1)
    before = snapshot(model)
    metrics = tr.train(context(model, tr, round=1, task=TrainTask(branch=1)))
    after = snapshot(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"heads.1.weight", "heads.1.bias"} and metrics["lpft.probe"] == 1.0
    assert all(p.grad is None and p.requires_grad for p in model.trunk.parameters())  # no backward through it
    metrics = tr.train(context(model, tr, round=2, task=TrainTask(branch=1)))
    assert not torch.equal(model.state_dict()["trunk.1.weight"], after["trunk.1.weight"])
    assert metrics["lpft.probe"] == 0.0


def test_lpft_probe_respects_the_server_restriction_and_keeps_the_trunk_in_eval_mode():
    tr = trainer("lpft", probe_rounds=5)
    model = build("cnn", channels=[4], dropout=0.5)
    ctx = context(model, tr, task=TrainTask(trainable=["heads.0.bias"]))
    before = snapshot(model)
    tr.train(ctx)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"heads.0.bias"}
    assert not model.trunk.training and model.heads.training


# ---------------------------------------------------------------------------------------------------- Head2Toe


def test_group_lasso_penalty_proximal_step_and_selection():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 30, generator=g)
    norms = [math.sqrt(sum(float(w[c, i]) ** 2 for c in range(4))) for i in range(30)]
    assert group_lasso_penalty(w, 0.3).item() == pytest.approx(0.3 * sum(norms), rel=1e-6)
    tau = sorted(norms)[10]  # 10 columns have a smaller norm
    shrunk = w.clone()
    group_soft_threshold_(shrunk, tau)
    for i, n in enumerate(norms):
        if n <= tau:
            assert torch.equal(shrunk[:, i], torch.zeros(4))
        else:  # same direction, norm reduced by exactly tau
            assert torch.allclose(shrunk[:, i], w[:, i] * (n - tau) / n, atol=1e-6)
    mask = select_features(w, 0.25)
    order = sorted(range(30), key=lambda i: -norms[i])
    assert int(mask.sum()) == math.floor(30 * 0.25) == 7
    assert set(mask.nonzero().flatten().tolist()) == set(order[:7])


def test_pooled_blocks_have_unit_norm_and_fit_the_target_size():
    a = torch.rand(3, 16, 10, 10)
    p = pool_block(a, 100)
    assert p.shape == (3, 64)  # 16 channels x 2 x 2 is the largest square grid under 100
    assert torch.allclose(p.norm(dim=1), torch.ones(3))
    assert pool_block(torch.rand(3, 1000), 100).shape == (3, 100)


def test_head2toe_model_concatenates_unit_norm_blocks_and_freezes_the_trunk():
    model = build(hidden=[16, 12])  # blocks: 16, 12, then the 64-wide feature (the trunk's output)
    tr = trainer("head2toe", target_size=32)
    tr.prepare_model(model)
    assert model.feature_dim == 16 + 12 + 32 and model.heads[0].in_features == 60
    z = model.features(torch.rand(5, *SHAPE))
    for lo, hi in [(0, 16), (16, 28), (28, 60)]:
        assert torch.allclose(z[:, lo:hi].norm(dim=1), torch.ones(5), atol=1e-6)
    assert sorted(tr.shared_names(model)) == ["heads.0.bias", "heads.0.weight"]
    assert copy.deepcopy(model)(torch.rand(2, *SHAPE)).logits.shape == (2, 1, 10)  # hooks survive a copy


def train_head2toe(coef, round=0, seed=0, keep_fraction=0.1):
    model = build(seed=seed)
    tr = trainer("head2toe", coef=coef, selection_rounds=1, keep_fraction=keep_fraction)
    tr.prepare_model(model)
    before = snapshot(model)
    tr.train(context(model, tr, n=60, round=round))
    return model, before


def test_head2toe_group_lasso_zeroes_groups_at_high_penalty_only():
    low, _ = train_head2toe(coef=0.0)
    high, before = train_head2toe(coef=2.0)
    zero = lambda m: int((m.heads[0].weight.norm(dim=0) == 0).sum())  # noqa: E731
    assert zero(low) == 0
    assert zero(high) > 0.9 * high.feature_dim
    trunk = [k for k in before if k.startswith("trunk.")]
    assert all(torch.equal(high.state_dict()[k], before[k]) for k in trunk)


def test_head2toe_refit_keeps_the_received_top_features_only():
    model, before = train_head2toe(coef=1e-4, round=1, keep_fraction=0.25)
    w0, w1 = before["heads.0.weight"], model.heads[0].weight
    kept = set((w1.norm(dim=0) > 0).nonzero().flatten().tolist())
    top = set(torch.argsort(w0.pow(2).sum(0), descending=True)[:math.floor(w0.shape[1] * 0.25)].tolist())
    assert kept == top


# ---------------------------------------------------------------------------------------------------- EMA teacher


def test_ema_update_rule():
    g = torch.Generator().manual_seed(0)
    s = {"w": torch.randn(20, generator=g)}
    t0 = torch.randn(20, generator=g)
    t = {"w": t0.clone()}
    ema_update_(t, s, 1.0)
    assert torch.equal(t["w"], t0)
    ema_update_(t, s, 0.0)
    assert torch.equal(t["w"], s["w"])
    t = {"w": t0.clone()}
    ema_update_(t, s, 0.9)
    assert torch.allclose(t["w"], 0.9 * t0 + 0.1 * s["w"])


def test_probabilistic_pseudo_mixup():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    x = torch.arange(8.0).view(4, 2)
    perm = torch.tensor([2, 3, 0, 1])
    x_mix, target, conf, lam = prob_pseudo_mixup(x, probs, perm, smoothing=0.1)
    assert ((lam > 0) & (lam < 1)).all() and lam[0] == 0.5 and lam[2] == 0.5  # equal confidences 0.8, 0.8
    assert lam[1].item() == pytest.approx(0.6 / 1.0)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert torch.allclose(x_mix[1], 0.6 * x[1] + 0.4 * x[3])
    # smoothed one-hot of class 1 (0.9 + 0.1/3 on it) mixed 0.6 with that of class 2
    assert target[1].tolist() == pytest.approx([0.1 / 3, 0.6 * (0.9 + 0.1 / 3) + 0.4 * 0.1 / 3,
                                                0.6 * 0.1 / 3 + 0.4 * (0.9 + 0.1 / 3)])
    assert conf.tolist() == pytest.approx([0.8, 0.6, 0.8, 0.6])
    logits = torch.randn(4, 3)
    assert unlabelled_loss(logits, target, conf, threshold=0.9).item() == 0.0
    assert unlabelled_loss(logits, target, conf, threshold=0.7).item() > 0.0


def test_ema_teacher_persists_in_state_across_rounds():
    tr = trainer("ema_teacher", decay=1.0)
    model = build()
    received0 = {k: v for k, v in snapshot(model).items() if v.is_floating_point()}
    state = {}
    tr.train(context(model, tr, state=state, unlabelled=0.5))
    assert set(state) == {STATE + k for k in received0}
    assert all(torch.equal(state[STATE + k], v) for k, v in received0.items())  # decay 1: teacher never moves
    with torch.no_grad():  # the next round's received model differs; the stored teacher still wins
        for p in model.parameters():
            p.add_(1.0)
    tr.train(context(model, tr, state=state, round=1, unlabelled=0.5))
    assert all(torch.equal(state[STATE + k], v) for k, v in received0.items())
    tr = trainer("ema_teacher", decay=0.0)  # decay 0: the teacher is the student after the last step
    state = {}
    tr.train(context(model, tr, state=state, unlabelled=0.5))
    assert all(torch.equal(state[STATE + k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def test_ema_teacher_unlabelled_loss_trains_the_student():
    tr = trainer("ema_teacher", threshold=0.0, teacher="received")
    model = build()
    state = {}
    ctx = context(model, tr, state=state, unlabelled=1.0)  # no labels at all: only L_u can move the model
    before = snapshot(model)
    metrics = tr.train(ctx)
    assert metrics["loss"] == 0.0 and metrics["ema_teacher.loss_u"] > 0
    assert not torch.equal(model.state_dict()["heads.0.weight"], before["heads.0.weight"])
    assert state == {}  # the received-model teacher keeps nothing


def test_ema_teacher_needs_unlabelled_data():
    with pytest.raises(ScenarioError) as err:
        scenario("ema_teacher")
    assert any(key == "data.unlabelled" for key, _ in err.value.problems)
    assert scenario("ema_teacher", "data.unlabelled=0.5").client.strategy == "ema_teacher"


# ---------------------------------------------------------------------------------------------------- beta-VAE


def test_kl_term_against_torch_distributions():
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-5)


def test_beta_one_is_the_negative_elbo_and_beta_scales_the_kl():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 3, 3, generator=g).round()
    logits = torch.randn(4, 1, 3, 3, generator=g)
    mu, logvar = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    recon = reconstruction_loss(x, logits, "bernoulli")
    kl = kl_divergence(mu, logvar)
    nll = -torch.distributions.Bernoulli(logits=logits).log_prob(x).sum() / 4
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    neg_elbo = nll + torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum() / 4
    assert beta_vae_loss(recon, kl, BetaVAEParams(beta=1.0)).item() == pytest.approx(neg_elbo.item(), rel=1e-5)
    diff = beta_vae_loss(recon, kl, BetaVAEParams(beta=4.0)) - beta_vae_loss(recon, kl, BetaVAEParams(beta=0.0))
    assert diff.item() == pytest.approx(4 * kl.item(), rel=1e-5)


def test_capacity_grows_then_clamps():
    assert capacity(0, 25.0, 100) == 0.0 and capacity(50, 25.0, 100) == 12.5
    assert capacity(100, 25.0, 100) == 25.0 and capacity(10_000, 25.0, 100) == 25.0
    p = BetaVAEParams(objective="B", gamma=10.0, c_max=2.0, c_stop_iter=4)
    assert beta_vae_loss(torch.tensor(1.0), torch.tensor(3.0), p, step=100).item() == pytest.approx(1 + 10 * 1.0)


def test_beta_vae_decoder_is_part_of_the_model_and_trains():
    model = build()
    tr = trainer("beta_vae", objective="B")
    tr.prepare_model(model)
    assert tr.shared_names(model) is None  # the decoder travels and is averaged like the rest
    before = snapshot(model)
    state = {}
    metrics = tr.train(context(model, tr, state=state))
    assert not torch.equal(model.state_dict()["vae.decoder.2.weight"], before["vae.decoder.2.weight"])
    assert state["beta_vae/steps"] == metrics["steps"] == 4  # objective B's counter, per client
    x = torch.rand(3, *SHAPE)
    assert model.vae(model.features(x), torch.zeros(3, 10))[0].shape == x.shape


# ---------------------------------------------------------------------------------------------------- model.pretrained


@pytest.mark.parametrize("name", ["lpft", "lora"])
def test_pretrained_checkpoint_is_the_start_and_frozen_weights_stay_it(tmp_path, name):
    # the default scenario's model (mlp, hidden [64], feature 32) built with another seed: a "pretrained" one,
    # saved like a run's model.pt
    ckpt = {k: v.clone() for k, v in build(hidden=[64], feature_dim=32, seed=123).state_dict().items()}
    torch.save(ckpt, tmp_path / "model.pt")
    extra = "client.probe_rounds=1" if name == "lpft" else "client.r=4"
    world = World.build(scenario(name, f"model.pretrained={tmp_path / 'model.pt'}", extra))
    sd = world.model.state_dict()
    # LoRA wraps the trunk's layers: trunk.1.weight lives on as trunk.1.base.weight
    base = {k: re.sub(r"^(trunk\.\d+)\.", r"\1.base.", k) if name == "lora" else k for k in ckpt}
    assert all(torch.equal(sd[base[k]], v) for k, v in ckpt.items())  # starts from the checkpoint
    shared = world.trainer.shared_names(world.model)
    world.run_client(ClientInstruction(0, {k: v for k, v in sd.items() if shared is None or k in shared}), 0, {})
    sd = world.model.state_dict()
    trunk = [k for k in ckpt if k.startswith("trunk.")]
    assert all(torch.equal(sd[base[k]], ckpt[k]) for k in trunk)  # probe round (lpft) / frozen (lora)
    assert not torch.equal(sd["heads.0.weight"], ckpt["heads.0.weight"])
