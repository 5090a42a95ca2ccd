"""Training-batch augmentation (``client.augment``): fedshift/augment.py and its hooks in clients/base.py and
simulation/world.py. The checks of shared/reference/robustness_methods.md section 2 (e), plus the pixel-range,
seeding and validation rules; expected values come from the formulas (recomputed here), never from the code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("kornia")

from fedshift.clients import CLIENT_STRATEGIES  # noqa: E402
from fedshift.clients.base import Batch, ClientData, TrainContext, TrainTask  # noqa: E402
from fedshift.strategies.base import ClientInstruction  # noqa: E402

from fedshift import augment as A  # noqa: E402
from fedshift.augment import AUGMENTATIONS, ConsistencyViews, build_augmenter, from_unit, jensen_shannon, to_unit
from fedshift.core.errors import ScenarioError  # noqa: E402
from fedshift.core.params import ComponentParams, ComponentSpec
from fedshift.nets.models import MLP, MLPParams  # noqa: E402
from fedshift.runtime.worker import World  # noqa: E402
from fedshift.scenario import load_scenario  # noqa: E402
from fedshift.schema import ClientConfig

NAMES = ["color_jitter", "randaugment", "autoaugment", "augmix"]
# options that make every augmentation change its input (color_jitter's defaults are the identity)
ACTIVE = {"color_jitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.3}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(name: str, shape=(1, 8, 8), **opts):
    """The augmentation with these options (ACTIVE's when none are given)."""
    cls = AUGMENTATIONS.get(name)
    return cls(cls.Params(**(opts or ACTIVE.get(name, {}))), shape)


def standardised(n: int, shape, seed: int = 0) -> torch.Tensor:
    """Images not in [0, 1]: per-image standardised, as CIFAR with standardize: true."""
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    return x / x.std(dim=(1, 2, 3), keepdim=True)


def run_seeded(aug, x, seed):
    torch.manual_seed(seed)
    return aug(x)


# ------------------------------------------------------------------------------------------ every augmentation


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_range_are_kept_and_the_batch_changes(name, shape):
    aug = make(name, shape)
    x = standardised(16, shape)
    changed = False
    for seed in range(4):  # AutoAugment's sub-policy can skip every step of a batch by its probabilities
        y = run_seeded(aug, x, seed)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        # mapped to [0, 1] per image, augmented, mapped back: never outside the image's own range
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        assert (y >= lo - 1e-5).all() and (y <= hi + 1e-5).all()
        changed |= not torch.allclose(y, x, atol=1e-4)
    assert changed


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed_and_different_under_another(name):
    aug, x = make(name, (3, 16, 16)), standardised(32, (3, 16, 16))
    a, b = run_seeded(aug, x, 5), run_seeded(aug, x, 5)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, run_seeded(aug, x, s)) for s in (6, 7, 8))


# ----------------------------------------------------------------------------------------------- ColorJitter


def test_color_jitter_with_default_factors_is_the_identity():
    for shape in [(1, 8, 8), (3, 8, 8)]:
        x = standardised(8, shape)
        assert torch.equal(run_seeded(make("color_jitter", shape, brightness=0, contrast=0, saturation=0, hue=0),
                                      x, 0), x)


def test_color_jitter_brightness_multiplies_each_image_by_a_factor_in_range():
    """torchvision's brightness: x * f, f ~ U[1 - b, 1 + b], clipped to [0, 1]. Images spanning exactly [0, 1]
    make the per-image pixel map the identity, so the ratio is visible directly."""
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x, _, _ = to_unit(x)
    y = run_seeded(make("color_jitter", brightness=0.5), x, 0)
    factors = []
    for xi, yi in zip(x, y):
        keep = (xi > 0.05) & (yi < 0.999)  # away from 0 and the clip
        ratio = yi[keep] / xi[keep]
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), atol=1e-4)
        factors.append(float(ratio.mean()))
    assert min(factors) >= 0.5 - 1e-4 and max(factors) <= 1.5 + 1e-4
    assert max(factors) - min(factors) > 0.2  # drawn per image


def test_saturation_and_hue_leave_a_greyscale_image_unchanged():
    """1-channel images go through kornia as 3 equal channels: saturation and hue are the identity on grey."""
    x = standardised(16, (1, 8, 8))
    y = run_seeded(make("color_jitter", saturation=0.9, hue=0.5), x, 0)
    assert torch.allclose(y, x, atol=1e-5)
    rgb = run_seeded(make("color_jitter", (3, 8, 8), saturation=0.9, hue=0.5), standardised(16, (3, 8, 8)), 0)
    assert not torch.allclose(rgb, standardised(16, (3, 8, 8)), atol=1e-3)  # and not on colour images


# ----------------------------------------------------------------------------------------------- RandAugment


def test_randaugment_with_zero_ops_is_the_identity():
    x = standardised(8, (3, 8, 8))
    assert torch.equal(run_seeded(make("randaugment", (3, 8, 8), n=0), x, 0), x)


# -------------------------------------------------------------------------------------------------- AugMix


def test_augmix_with_m_zero_returns_the_clean_image(monkeypatch):
    def no_mixing(batch, width, alpha, device):
        return torch.full((batch, width), 1.0 / width), torch.zeros(batch)

    monkeypatch.setattr(A, "mixing_weights", no_mixing)
    x = standardised(16, (3, 16, 16))
    assert torch.equal(run_seeded(make("augmix", (3, 16, 16), all_ops=True), x, 0), x)


def test_augmix_mix_is_the_convex_combination():
    x = torch.rand(2, 1, 2, 2)
    chains = torch.rand(3, 2, 1, 2, 2)
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    m = torch.tensor([0.25, 1.0])
    out = A.augmix_mix(x, chains, w, m)
    expected0 = 0.75 * x[0] + 0.25 * (0.2 * chains[0, 0] + 0.3 * chains[1, 0] + 0.5 * chains[2, 0])
    assert torch.allclose(out[0], expected0) and torch.allclose(out[1], chains[0, 1])


def test_mixing_weights_are_dirichlet_and_beta_per_image():
    torch.manual_seed(0)
    w, m = A.mixing_weights(4000, 3, 1.0, torch.device("cpu"))
    assert w.shape == (4000, 3) and torch.allclose(w.sum(1), torch.ones(4000)) and (w >= 0).all()
    # Dirichlet(1, 1, 1): each weight has mean 1/3, variance 2/36; Beta(1, 1) is uniform: mean 1/2, variance 1/12
    assert abs(float(w.mean()) - 1 / 3) < 0.01 and abs(float(w[:, 0].var()) - 2 / 36) < 0.005
    assert abs(float(m.mean()) - 0.5) < 0.02 and abs(float(m.var()) - 1 / 12) < 0.006


def _record_ops(monkeypatch) -> list[tuple[str, int]]:
    """Every AugMix op call as (name, images it was applied to)."""
    used: list[tuple[str, int]] = []
    for table in (A.PIXEL_OPS, A.GEOMETRIC_OPS, A.EXTRA_OPS):
        for name, fn in list(table.items()):
            def recorded(x, severity, name=name, fn=fn):
                used.append((name, len(x)))
                return fn(x, severity)
            monkeypatch.setitem(table, name, recorded)
    return used


def test_augmix_without_all_ops_never_samples_the_imagenet_c_ops(monkeypatch):
    used = _record_ops(monkeypatch)
    x = standardised(64, (3, 8, 8))
    for seed in range(5):
        run_seeded(make("augmix", (3, 8, 8)), x, seed)
    names = {name for name, _ in used}
    assert names == set(A.REFERENCE_OPS)  # every reference op drawn, nothing else
    assert not {"brightness", "contrast", "color", "sharpness"} & names
    used.clear()
    for seed in range(5):
        run_seeded(make("augmix", (3, 8, 8), all_ops=True), x, seed)
    assert {"brightness", "contrast", "color", "sharpness"} <= {name for name, _ in used}


def test_augmix_chains_apply_depth_ops_each(monkeypatch):
    used = _record_ops(monkeypatch)
    x = standardised(100, (1, 8, 8))
    run_seeded(make("augmix", mixture_width=2, mixture_depth=2), x, 0)
    assert sum(n for _, n in used) == 2 * 2 * 100  # width 2 x depth 2 ops on each of 100 images
    used.clear()
    run_seeded(make("augmix", mixture_width=3), x, 0)
    # depth -1: 1, 2 or 3 ops per chain, uniformly: 3 x 100 chains, 2 ops each on average (sd of the sum ~14)
    assert abs(sum(n for _, n in used) - 600) < 80


def test_augmix_translation_moves_pixels_by_whole_steps(monkeypatch):
    """The geometric ops' matrices act in pixel coordinates: level 3 on a 30-pixel-wide image shifts by
    int(3 * 10 / 10) = 3 pixels, exactly (bilinear sampling at whole pixels)."""
    monkeypatch.setattr(A, "_level", lambda x, severity: torch.full((len(x),), 3.0))
    monkeypatch.setattr(A, "_sign", lambda x: torch.ones(len(x)))
    x = torch.zeros(1, 1, 30, 30)
    x[0, 0, 10, 12] = 1.0
    out = A.augmix_step(x, ["translate_x"], torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 3.0)
    assert out[0, 0, 10, 15] == 1.0 and out.sum() == 1.0
    out = A.augmix_step(x, ["translate_y"], torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool), 3.0)
    assert out[0, 0, 13, 12] == 1.0 and out.sum() == 1.0
    inactive = A.augmix_step(x, ["translate_y"], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool),
                             3.0)
    assert torch.equal(inactive, x)


def test_augmix_pixel_ops_follow_pil():
    x = torch.tensor([0.2, 0.4, 0.6, 0.8]).view(1, 1, 2, 2)
    assert torch.allclose(A.autocontrast(x, 3.0), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).view(1, 1, 2, 2))
    torch.manual_seed(0)
    sol = A.solarize(torch.tensor([0.1, 0.99]).view(1, 1, 1, 2), 3.0)  # threshold >= 180/255: only 0.99 inverts
    assert torch.allclose(sol.flatten(), torch.tensor([0.1, 0.01]), atol=1e-6)


# -------------------------------------------------------------------------------------------- pixel range


def test_min_max_map_round_trips_and_spans_unit_range():
    x = torch.cat([standardised(6, (3, 5, 5)), torch.full((1, 3, 5, 5), 2.5)])
    x01, low, scale = to_unit(x)
    assert torch.allclose(from_unit(x01, low, scale), x, atol=1e-6)
    assert torch.allclose(x01[:6].amin(dim=(1, 2, 3)), torch.zeros(6))
    assert torch.allclose(x01[:6].amax(dim=(1, 2, 3)), torch.ones(6))
    assert torch.equal(from_unit(x01[6:], low[6:], scale[6:]), x[6:])  # a constant image: scale 1, no NaN


# --------------------------------------------------------------------------------------------- JSD term


def js_by_hand(*logit_rows: list[float]) -> float:
    """(1/n) sum_v sum_c p_v,c * log(p_v,c / M_c), M = mean of the p_v, for one example."""
    probs = [[math.exp(z) / sum(math.exp(t) for t in row) for z in row] for row in logit_rows]
    mixture = [max(sum(p[c] for p in probs) / len(probs), 1e-7) for c in range(len(probs[0]))]
    return sum(p[c] * math.log(p[c] / mixture[c]) for p in probs for c in range(len(p)) if p[c] > 0) / len(probs)


def test_jensen_shannon_is_zero_for_equal_logits_and_matches_the_formula():
    z = torch.randn(5, 4)
    assert float(jensen_shannon([z, z.clone(), z.clone()])) == pytest.approx(0.0, abs=1e-7)
    a, b, c = [0.0, 0.0], [2.0, 0.0], [0.0, 1.0]
    got = jensen_shannon([torch.tensor([a]), torch.tensor([b]), torch.tensor([c])])
    assert float(got) == pytest.approx(js_by_hand(a, b, c), rel=1e-5) and float(got) > 0
    # batchmean: the mean of the per-example values
    two = jensen_shannon([torch.tensor([a, a]), torch.tensor([b, a]), torch.tensor([c, a])])
    assert float(two) == pytest.approx(js_by_hand(a, b, c) / 2, rel=1e-5)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return MLP.build((1, 8, 8), 3, 2, 6, MLPParams(hidden=[8]))


def context(model, data, branch: int = 0, lr: float = 0.1) -> TrainContext:
    settings = ClientConfig(strategy="erm", lr=lr, batch_size=8)
    return TrainContext(model=model, data=data, task=TrainTask(branch=branch), device=torch.device("cpu"), round=0,
                        cid=0, state={}, generator=torch.Generator().manual_seed(0), settings=settings)


def test_train_context_loss_adds_lam_times_js_on_the_task_branch():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    x, v1, v2 = (torch.rand(6, 1, 8, 8, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0, 1, -1])  # one hidden label: JS still covers every example
    batch = Batch(x, y, torch.zeros(6, dtype=torch.long), ConsistencyViews((v1, v2), 12.0))
    ctx = context(model, ClientData(x, y, batch.domain, 3), branch=1)
    loss = ctx.loss(model(x), batch)
    logits = [model(t).logits[:, 1] for t in (x, v1, v2)]
    ce = F.cross_entropy(logits[0][:5], y[:5])
    js = sum(js_by_hand(*(lg[i].tolist() for lg in logits)) for i in range(6)) / 6
    assert loss.item() == pytest.approx(ce.item() + 12.0 * js, rel=1e-5)
    assert float(ctx.loss_terms["jsd"]) == pytest.approx(js, rel=1e-5)
    plain = ctx.loss(model(x), Batch(x, y, batch.domain))
    assert plain.item() == pytest.approx(ce.item(), rel=1e-6)


def test_erm_training_with_augmix_jsd_reports_a_finite_loss_and_the_jsd_metric():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    augment = build_augmenter([ComponentSpec(name="augmix", jsd=True)], (1, 8, 8))
    data = ClientData(x, y, torch.zeros(24, dtype=torch.long), 3, augment)
    cls = CLIENT_STRATEGIES.get("erm")
    trainer = cls(cls.Params(), ClientConfig(strategy="erm", lr=0.1, batch_size=8))
    torch.manual_seed(0)
    metrics = trainer.train(context(tiny_model(), data))
    assert math.isfinite(metrics["loss"]) and metrics["jsd"] > 0 and metrics["steps"] == 3
    assert torch.equal(data.x, x)  # the stored examples are never augmented


def test_batches_carry_views_only_with_jsd_and_later_entries_augment_them_too():
    x = standardised(8, (1, 8, 8))
    data = ClientData(x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), 3,
                      build_augmenter(["augmix"], (1, 8, 8)))
    torch.manual_seed(0)
    batch = next(data.batches(8, torch.Generator().manual_seed(0), shuffle=False))
    assert batch.consistency is None and not torch.allclose(batch.x, x)
    class AddHundred(A.Augmentation):  # a marker: +100 on every pixel
        def __call__(self, x):
            return x + 100

    augmix = make("augmix", jsd=True, lam=3.0)
    augmenter = A.BatchAugmenter([augmix, AddHundred(ComponentParams(), (1, 8, 8))])
    torch.manual_seed(0)
    out = augmenter(Batch(x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)))
    assert out.consistency.weight == 3.0 and len(out.consistency.views) == 2
    assert torch.equal(out.x, x + 100)  # the clean batch stays clean up to the later entry
    torch.manual_seed(0)
    view = augmix(x)
    assert torch.equal(out.consistency.views[0], view + 100)  # the views are AugMix's, then the later entry's
    assert not torch.equal(out.consistency.views[0], out.consistency.views[1])


# ----------------------------------------------------------------------------------------- scenario, World


def small(*overrides):
    return load_scenario("default", ["rounds=2", "clients_per_round=2", "data.clients_per_mode=3",
                                     "output.tensorboard=false", "output.save_model=false", *overrides])


def test_unknown_option_and_bad_value_are_validation_errors_naming_the_entry():
    with pytest.raises(ScenarioError) as err:
        small("client.augment=[{name: augmix, widht: 2}, {name: randaugment, m: 40}]")
    keys = dict(err.value.problems)
    assert "client.augment.0.widht" in keys and "mixture_width" in keys["client.augment.0.widht"]
    assert "client.augment.1.m" in keys
    with pytest.raises(ScenarioError, match=r"client\.augment\.0\.name: unknown augmentation 'mixup'"):
        small("client.augment=[{name: mixup}]")


def test_defaults_are_written_back():
    s = small("client.augment=[augmix, {name: randaugment, n: 1}]")
    assert s.client.augment[0].params() == {"severity": 3, "mixture_width": 3, "mixture_depth": -1, "alpha": 1.0,
                                            "all_ops": False, "jsd": False, "lam": 12.0}
    assert s.client.augment[1].params() == {"n": 1, "m": 9}


def test_non_image_examples_fail_at_validation_and_when_the_world_is_built():
    with pytest.raises(ScenarioError, match=r"client\.augment\.0: mode 'day' \(dataset 'synthetic'\).*\[16\]"):
        small("client.augment=[augmix]", "data.dataset={name: synthetic, shape: [16]}")
    with pytest.raises(ScenarioError, match=r"client\.augment\.1: randaugment: .*shape \[2, 8, 8\]"):
        build_augmenter(["augmix", "randaugment"], (2, 8, 8))


def test_missing_kornia_is_a_validation_error_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(A, "kornia_available", lambda: False)
    with pytest.raises(ScenarioError, match=r"client\.augment\.0: .*pip install 'fedshift\[augment\]'"):
        small("client.augment=[color_jitter]")


def test_a_second_jsd_entry_is_rejected():
    with pytest.raises(ScenarioError, match=r"client\.augment\.1: only one augmix entry may set jsd"):
        small("client.augment=[{name: augmix, jsd: true}, {name: augmix, jsd: true}]")


def test_world_runs_clients_with_reproducible_augmented_batches(monkeypatch):
    """run_client seeds torch's global generator per (seed, round, client): the same client and round see
    bitwise the same augmented batches; another client or round draws differently (shown on a fixed probe
    batch augmented first, so that different data cannot be the reason)."""
    world = World.build(small("client.augment=[augmix, {name: color_jitter, brightness: 0.5}]", "client.max_steps=2"))
    probe = Batch(standardised(4, (1, 8, 8)), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    inner, seen = world.augment, []

    def recording(batch):
        if not seen:
            seen.append(inner(probe).x)
        out = inner(batch)
        seen.append(out.x)
        return out

    monkeypatch.setattr(world, "augment", recording)
    start = {k: v.clone() for k, v in world.model.state_dict().items()}

    def batches(cid: int, round_: int) -> list[torch.Tensor]:
        seen.clear()
        world.run_client(ClientInstruction(cid, {k: v.clone() for k, v in start.items()}, {}), round_, {})
        return list(seen)

    first = batches(0, 0)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, batches(0, 0)))
    assert not torch.allclose(first[1], world.client_data(0).x[:len(first[1])])
    assert not torch.equal(first[0], batches(0, 1)[0])
    assert not torch.equal(first[0], batches(1, 0)[0])
