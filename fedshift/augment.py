"""Augmentation of training batches on the training device (``client.augment``), with kornia.

Each entry of ``client.augment`` names a registered ``Augmentation``; ``build_augmenter`` turns the list into a
``BatchAugmenter`` that ``ClientData.batches`` applies, in list order, to every training batch (and to nothing
else: evaluation and the feature or error passes of JTT, GPM, IFCA and FedTKM read ``ClientData.x`` as is).

Pixel range. kornia's colour and histogram operations expect pixels in [0, 1], but fedshift's inputs are not all
there (standardised CIFAR images have mean 0 and std 1 per image; ``synthetic`` data are clipped noise). So every
augmentation maps each image to [0, 1] by its own minimum and maximum, augments it, and maps it back with the same
affine map: nothing is clipped that the image had, and the model keeps seeing its usual input scale (a fixed
[0, 1] assumption would clip standardised images to their positive half). An image with max == min keeps scale 1.

Greyscale. RandAugment, AutoAugment and ColorJitter reach kornia operations that need 3 channels (saturation,
hue, kornia's "color"); a 1-channel image is repeated to 3 equal channels, augmented, and averaged back. This is
exact, not an approximation: saturation and hue leave a grey image (R = G = B) unchanged, as PIL's
``ImageEnhance.Color`` does on an "L" image, and every other operation acts on the three equal channels alike.

Seeding. Every random draw (kornia's and AugMix's) comes from torch's global generator on the batch's device,
which ``World.run_client`` seeds with the per-(scenario seed, round, client) seed before training: the same
scenario and seed give bitwise the same augmented batches, and different clients or rounds draw differently.

kornia is an optional dependency (``pip install 'fedshift[augment]'``), imported when an augmentation runs;
``Augmentation.check_scenario`` reports its absence when a scenario is validated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from fedshift.core.errors import ScenarioError
from fedshift.core.params import ComponentParams, ComponentSpec
from fedshift.core.registry import Registry

if TYPE_CHECKING:
    from fedshift.schema import DatasetSpec, Scenario

AUGMENTATIONS: Registry[type[Augmentation]] = Registry("augmentation")

INSTALL_HINT = "pip install 'fedshift[augment]'"
JS_CLAMP = 1e-7  # the reference clamps the mixture distribution M to [1e-7, 1] before its log


# --------------------------------------------------------------------------------------------- pixel range


def to_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image of [B, C, H, W] mapped to [0, 1] by its own min and max: (x01, low, scale), with
    ``x == x01 * scale + low`` up to rounding; a constant image gets scale 1."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - low
    scale = torch.where(span > 0, span, torch.ones_like(span))
    return ((x - low) / scale).clamp(0, 1), low, scale


def from_unit(x01: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_unit``'s map, with its ``low`` and ``scale``."""
    return x01 * scale + low


def image_shape_problem(shape: Sequence[int]) -> str | None:
    """Why examples of this shape cannot be augmented (None if they can: [C, H, W] with C 1 or 3)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return None
    return (f"augmentations need image examples [C, H, W] with C = 1 or 3, got examples of shape {list(shape)}; "
            "remove client.augment for this dataset")


def declared_input_shape(spec: DatasetSpec) -> tuple[int, ...] | None:
    """The example shape a dataset's options declare before it is loaded: ``shape`` (synthetic) or
    ``sequence_length`` (token sequences, e.g. stackoverflow); None when only loading tells."""
    opts = spec.params()
    if isinstance(opts.get("shape"), list):
        return tuple(opts["shape"])
    if isinstance(opts.get("sequence_length"), int):
        return (opts["sequence_length"],)
    return None


def with_three_channels(fn: Callable[[torch.Tensor], torch.Tensor], x01: torch.Tensor) -> torch.Tensor:
    """``fn`` on 3-channel images: a 1-channel batch is repeated to RGB and averaged back (exact for grey
    images, see the module docstring)."""
    if x01.shape[1] == 3:
        return fn(x01)
    return fn(x01.expand(-1, 3, -1, -1).contiguous()).mean(dim=1, keepdim=True)


def kornia_available() -> bool:
    return importlib.util.find_spec("kornia") is not None


# ------------------------------------------------------------------------------------------------- base


class Augmentation:
    """A registered augmentation: ``Params`` holds its options; an instance maps a batch [B, C, H, W] to an
    augmented batch of the same shape and dtype. Subclasses implement ``augment_unit`` on images already mapped
    to [0, 1] (module docstring), or override ``__call__``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams

    def __init__(self, params: ComponentParams, input_shape: tuple[int, ...]):
        problem = image_shape_problem(input_shape)
        if problem is not None:
            raise ValueError(problem)
        self.params = params
        self.input_shape = tuple(input_shape)

    @classmethod
    def check_scenario(cls, params: ComponentParams, scenario: Scenario, key: str) -> list[tuple[str, str]]:
        """Problems of this entry (at ``key``, e.g. ``client.augment.0``) in this scenario, found without loading
        data: kornia missing, or a dataset whose options declare examples that are not images."""
        problems = []
        if not kornia_available():
            problems.append((key, f"augmentation {cls.name!r} needs kornia, which is not installed: {INSTALL_HINT}"))
        for mode in scenario.mode_names:
            spec = scenario.dataset_of_mode(mode)
            shape = declared_input_shape(spec)
            problem = None if shape is None else image_shape_problem(shape)
            if problem is not None:
                problems.append((key, f"mode {mode!r} (dataset {spec.name!r}): {problem}"))
                break
        return problems

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x01, low, scale = to_unit(x)
        return from_unit(self.augment_unit(x01).clamp(0, 1), low, scale).to(x.dtype)

    def augment_unit(self, x01: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ kornia's augmentations


class ColorJitterParams(ComponentParams):
    brightness: float = Field(0.0, ge=0, description="factor in [max(0, 1 - b), 1 + b]; multiplies the image")
    contrast: float = Field(0.0, ge=0, description="factor in [max(0, 1 - c), 1 + c]; blends with the grey mean")
    saturation: float = Field(0.0, ge=0, description="factor in [max(0, 1 - s), 1 + s]; blends with grey")
    hue: float = Field(0.0, ge=0, le=0.5, description="hue shift drawn from [-h, h] (fraction of the colour circle)")
    p: float = Field(1.0, ge=0, le=1, description="probability that an image is jittered")


@AUGMENTATIONS.register
class ColorJitter(Augmentation):
    """ColorJitter: random brightness, contrast, saturation and hue per image.

    ColorJitter: random brightness, contrast, saturation and hue factors per image, in random order
    (torchvision's ``ColorJitter`` formulas, through ``kornia.augmentation.ColorJitter``).

    Parameters (torchvision's defaults: all 0, which is the identity):
        brightness (0.0), contrast (0.0), saturation (0.0): factor ranges [max(0, 1 - v), 1 + v].
        hue (0.0): shift range [-hue, hue], at most 0.5. DomainBed trains with 0.3 for all four.
        p (1.0): probability that an image is jittered.
    """

    name = "color_jitter"
    Params = ColorJitterParams

    def __init__(self, params: ColorJitterParams, input_shape: tuple[int, ...]):
        super().__init__(params, input_shape)
        import kornia.augmentation as K

        self.identity = not (params.brightness or params.contrast or params.saturation or params.hue) or params.p == 0
        self.jitter = K.ColorJitter(params.brightness, params.contrast, params.saturation, params.hue, p=params.p)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # all factors neutral: return the batch itself rather than its min/max round trip (rounding)
        return x if self.identity else super().__call__(x)

    def augment_unit(self, x01: torch.Tensor) -> torch.Tensor:
        return with_three_channels(self.jitter, x01)


class RandAugmentParams(ComponentParams):
    n: int = Field(2, ge=0, le=15, description="operations applied one after another (0: identity)")
    m: int = Field(9, ge=1, le=29, description="global magnitude on a 0..30 scale")


@AUGMENTATIONS.register
class RandAugment(Augmentation):
    """RandAugment: n operations drawn from a fixed list, all at one magnitude m.

    RandAugment (Cubuk et al., 2020, "RandAugment: practical automated data augmentation with a reduced search
    space"): ``n`` operations drawn uniformly without replacement from a fixed list, all at magnitude ``m`` / 30 of
    their range, through ``kornia.augmentation.auto.RandAugment`` (its list: auto_contrast, equalize, invert,
    rotate, posterize, solarize, solarize_add, color, contrast, brightness, sharpness, shear_x/y, translate_x/y).

    Parameters (torchvision's defaults; WILDS also uses n = 2):
        n (2): operations per batch, 0 to 15; 0 is the identity.
        m (9): magnitude, 1 to 29 (kornia requires 0 < m < 30; torchvision's magnitude 9 of 31 bins is 9 / 30).

    Difference from torchvision: kornia draws the ``n`` operations once per batch (signs and probabilities per
    image), where torchvision's loader transform draws them per image.
    """

    name = "randaugment"
    Params = RandAugmentParams

    def __init__(self, params: RandAugmentParams, input_shape: tuple[int, ...]):
        super().__init__(params, input_shape)
        from kornia.augmentation.auto import RandAugment as KorniaRandAugment

        self.policy = KorniaRandAugment(n=params.n, m=params.m) if params.n > 0 else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.policy is None else super().__call__(x)

    def augment_unit(self, x01: torch.Tensor) -> torch.Tensor:
        return with_three_channels(self.policy, x01)


class AutoAugmentParams(ComponentParams):
    policy: Literal["imagenet", "cifar10", "svhn"] = Field("imagenet", description="the learned policy")


@AUGMENTATIONS.register
class AutoAugment(Augmentation):
    """AutoAugment: a sub-policy of a policy learned offline (ImageNet, CIFAR-10 or SVHN).

    AutoAugment (Cubuk et al., 2019, "AutoAugment: learning augmentation strategies from data"): a sub-policy
    (two (operation, probability, magnitude) steps) drawn from a policy learned offline, through
    ``kornia.augmentation.auto.AutoAugment``.

    Parameters (torchvision's default):
        policy ("imagenet"): imagenet | cifar10 | svhn.

    Difference from torchvision: kornia draws the sub-policy once per batch (each step's probability per image).
    """

    name = "autoaugment"
    Params = AutoAugmentParams

    def __init__(self, params: AutoAugmentParams, input_shape: tuple[int, ...]):
        super().__init__(params, input_shape)
        from kornia.augmentation.auto import AutoAugment as KorniaAutoAugment

        self.policy = KorniaAutoAugment(params.policy)

    def augment_unit(self, x01: torch.Tensor) -> torch.Tensor:
        return with_three_channels(self.policy, x01)


# ----------------------------------------------------------------------------------------------- AugMix ops
# google-research/augmix augmentations.py, on [N, C, H, W] images in [0, 1] with per-image random levels. Each op
# draws its level as the reference does: sample_level = U(0.1, severity); int_parameter(l, v) = int(l * v / 10);
# float_parameter(l, v) = l * v / 10; a random sign for the geometric ones. The geometric ops return each image's
# 2x3 affine matrix (pixel coordinates): AugMix warps all images of a step that drew one in a single bilinear
# warp_affine call, black (0) outside, as PIL fills.


def _level(x: torch.Tensor, severity: float) -> torch.Tensor:
    return torch.empty(len(x), device=x.device).uniform_(0.1, severity)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.rand(len(x), device=x.device) > 0.5, -1.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L" conversion (ITU-R 601-2 luma); a 1-channel image is its own grey."""
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def _enhance_factor(x: torch.Tensor, severity: float) -> torch.Tensor:
    return _level(x, severity) * 1.8 / 10 + 0.1


def autocontrast(x: torch.Tensor, severity: float) -> torch.Tensor:
    """PIL ImageOps.autocontrast: each channel stretched to [0, 1] (a constant channel is kept)."""
    low = x.amin(dim=(2, 3), keepdim=True)
    span = x.amax(dim=(2, 3), keepdim=True) - low
    return torch.where(span > 0, (x - low) / span.clamp_min(1e-12), x)


def equalize(x: torch.Tensor, severity: float) -> torch.Tensor:
    from kornia.enhance import equalize as kornia_equalize

    return kornia_equalize(x)


def posterize(x: torch.Tensor, severity: float) -> torch.Tensor:
    from kornia.enhance import posterize as kornia_posterize

    bits = 4 - (_level(x, severity) * 4 / 10).floor()
    return kornia_posterize(x, bits.to(torch.int64))


def solarize(x: torch.Tensor, severity: float) -> torch.Tensor:
    from kornia.enhance import solarize as kornia_solarize

    threshold = 256 - (_level(x, severity) * 256 / 10).floor()  # PIL inverts pixels >= threshold (of 0..255)
    return kornia_solarize(x, threshold / 255)


def color(x: torch.Tensor, severity: float) -> torch.Tensor:
    """PIL ImageEnhance.Color (saturation): blend with the grey image; the identity on 1-channel images."""
    return _blend(_grey(x), x, _enhance_factor(x, severity))


def contrast(x: torch.Tensor, severity: float) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: blend with the mean of the grey image."""
    return _blend(_grey(x).mean(dim=(1, 2, 3), keepdim=True), x, _enhance_factor(x, severity))


def brightness(x: torch.Tensor, severity: float) -> torch.Tensor:
    """PIL ImageEnhance.Brightness: blend with black."""
    return _blend(torch.zeros_like(x), x, _enhance_factor(x, severity))


def sharpness(x: torch.Tensor, severity: float) -> torch.Tensor:
    from kornia.enhance import sharpness as kornia_sharpness

    return kornia_sharpness(x, _enhance_factor(x, severity))


def _affine(x: torch.Tensor, entries: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """Identity 2x3 matrices [N, 2, 3] with the given entries set."""
    m = torch.eye(2, 3, device=x.device).repeat(len(x), 1, 1)
    for (i, j), v in entries.items():
        m[:, i, j] = v
    return m


def rotate(x: torch.Tensor, severity: float) -> torch.Tensor:
    """Rotation about the image centre by int(level * 30 / 10) degrees, random sign."""
    from kornia.geometry.transform import get_rotation_matrix2d

    h, w = x.shape[-2:]
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device).expand(len(x), 2)
    degrees = (_level(x, severity) * 30 / 10).floor() * _sign(x)
    return get_rotation_matrix2d(center, degrees, torch.ones(len(x), 2, device=x.device))


def shear_x(x: torch.Tensor, severity: float) -> torch.Tensor:
    return _affine(x, {(0, 1): _level(x, severity) * 0.3 / 10 * _sign(x)})


def shear_y(x: torch.Tensor, severity: float) -> torch.Tensor:
    return _affine(x, {(1, 0): _level(x, severity) * 0.3 / 10 * _sign(x)})


def translate_x(x: torch.Tensor, severity: float) -> torch.Tensor:
    """A shift by int(level * (W / 3) / 10) pixels (the reference's IMAGE_SIZE / 3, per axis), random sign."""
    return _affine(x, {(0, 2): (_level(x, severity) * (x.shape[3] / 3) / 10).floor() * _sign(x)})


def translate_y(x: torch.Tensor, severity: float) -> torch.Tensor:
    return _affine(x, {(1, 2): (_level(x, severity) * (x.shape[2] / 3) / 10).floor() * _sign(x)})


AugmixOp = Callable[[torch.Tensor, float], torch.Tensor]
# pixel ops return the images; geometric ops their affine matrices
PIXEL_OPS: dict[str, AugmixOp] = {"autocontrast": autocontrast, "equalize": equalize, "posterize": posterize,
                                  "solarize": solarize}
GEOMETRIC_OPS: dict[str, AugmixOp] = {"rotate": rotate, "shear_x": shear_x, "shear_y": shear_y,
                                      "translate_x": translate_x, "translate_y": translate_y}
# left out unless all_ops: they overlap the corruptions of ImageNet-C / CIFAR-10-C that AugMix is evaluated on
EXTRA_OPS: dict[str, AugmixOp] = {"color": color, "contrast": contrast, "brightness": brightness,
                                  "sharpness": sharpness}
REFERENCE_OPS = ["autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
                 "translate_x", "translate_y"]


def augmix_step(x01: torch.Tensor, op_names: list[str], choice: torch.Tensor, active: torch.Tensor,
                severity: float) -> torch.Tensor:
    """One step of every AugMix chain: row i applies ``op_names[choice[i]]`` where ``active[i]``."""
    from kornia.geometry.transform import warp_affine

    out = x01.clone()
    matrices = torch.eye(2, 3, device=x01.device).repeat(len(x01), 1, 1)
    warped = torch.zeros(len(x01), dtype=torch.bool, device=x01.device)
    for j, name in enumerate(op_names):
        rows = ((choice == j) & active).nonzero().squeeze(1)
        if not len(rows):
            continue
        if name in GEOMETRIC_OPS:
            matrices[rows] = GEOMETRIC_OPS[name](x01[rows], severity)
            warped[rows] = True
        else:
            out[rows] = (PIXEL_OPS.get(name) or EXTRA_OPS[name])(x01[rows], severity).clamp(0, 1)
    rows = warped.nonzero().squeeze(1)
    if len(rows):
        out[rows] = warp_affine(x01[rows], matrices[rows], tuple(x01.shape[-2:]), align_corners=True).clamp(0, 1)
    return out


def mixing_weights(batch: int, width: int, alpha: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: chain weights w ~ Dirichlet(alpha, ..., alpha) [B, width] and the mixing share m ~ Beta(alpha,
    alpha) [B]."""
    a = torch.tensor(float(alpha), device=device)
    w = torch.distributions.Dirichlet(a.expand(width)).sample((batch,))
    m = torch.distributions.Beta(a, a).sample((batch,))
    return w, m


def augmix_mix(x: torch.Tensor, chains: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * sum_k w_k * chain_k, per image; chains [width, B, C, H, W], w [B, width], m [B]. The
    coefficients are convex, so mixing commutes with the per-image affine pixel map (as the reference mixes after
    preprocessing)."""
    m = m.view(-1, 1, 1, 1).to(x.dtype)
    return (1 - m) * x + m * torch.einsum("bk,kbchw->bchw", w.to(x.dtype), chains)


class AugMixParams(ComponentParams):
    severity: int = Field(3, ge=1, le=10, description="operation strength; levels are drawn from U(0.1, severity)")
    mixture_width: int = Field(3, ge=1, description="augmentation chains mixed per image")
    mixture_depth: int = Field(-1, ge=-1, description="operations per chain; -1: uniform in {1, 2, 3} per chain")
    alpha: float = Field(1.0, gt=0, description="Dirichlet and Beta concentration of the mixing weights")
    all_ops: bool = Field(False, description="also brightness, contrast, color and sharpness (overlap ImageNet-C)")
    jsd: bool = Field(False, description="keep the clean batch and add lam * JS(clean, aug1, aug2) to the loss")
    lam: float = Field(12.0, ge=0, description="weight of the Jensen-Shannon consistency term (jsd only)")

    @model_validator(mode="after")
    def _depth(self):
        if self.mixture_depth == 0:
            raise ValueError("mixture_depth must be -1 (random 1..3) or >= 1, got 0")
        return self


@AUGMENTATIONS.register
class AugMix(Augmentation):
    """AugMix: chains of random operations mixed into the image, optionally with the JSD consistency loss.

    AugMix (Hendrycks et al., 2020, "AugMix: a simple data processing method to improve robustness and
    uncertainty"), after google-research/augmix cifar.py: per image, ``mixture_width`` chains of random operations
    (each ``mixture_depth`` long) are mixed with Dirichlet weights and the mixture is blended with the clean image
    by m ~ Beta. Built from kornia operations, since kornia has no AugMix.

    Parameters (the reference's CIFAR defaults):
        severity (3): operation strength, 1 to 10.
        mixture_width (3): chains per image.
        mixture_depth (-1): operations per chain; -1 draws 1, 2 or 3 per chain and image.
        alpha (1.0): Dirichlet([alpha] * width) chain weights and Beta(alpha, alpha) blend, per image.
        all_ops (False): the reference's op list (autocontrast, equalize, posterize, rotate, solarize, shear_x,
            shear_y, translate_x, translate_y); True adds color, contrast, brightness, sharpness, as
            torchvision's AugMix does by default.
        jsd (False): keep the clean batch, carry two AugMix views of it, and add ``lam * JS(p_clean, p_aug1,
            p_aug2)`` to the training loss (``TrainContext.loss``); without it the batch is replaced by its
            AugMix version.
        lam (12.0): weight of the JS term.

    Difference from the reference with jsd: the reference forwards the clean and the two augmented views in one
    concatenated batch, so BatchNorm normalises over 3B samples; here the clean batch is forwarded by the client
    strategy and each view separately by ``TrainContext.loss``, so BatchNorm sees three batches of B (and its
    running statistics take three updates per step).
    """

    name = "augmix"
    Params = AugMixParams

    def __init__(self, params: AugMixParams, input_shape: tuple[int, ...]):
        super().__init__(params, input_shape)
        self.op_names = REFERENCE_OPS + (list(EXTRA_OPS) if params.all_ops else [])

    @classmethod
    def check_scenario(cls, params: ComponentParams, scenario: Scenario, key: str) -> list[tuple[str, str]]:
        problems = super().check_scenario(params, scenario, key)
        jsd_keys = [f"client.augment.{i}" for i, spec in enumerate(scenario.client.augment)
                    if isinstance(spec, ComponentSpec) and spec.name == cls.name and spec.params().get("jsd")]
        if params.jsd and len(jsd_keys) > 1 and key != jsd_keys[0]:
            problems.append((key, f"only one augmix entry may set jsd: true ({jsd_keys[0]} already does)"))
        return problems

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p: AugMixParams = self.params  # type: ignore[assignment]
        b, width = len(x), p.mixture_width
        w, m = mixing_weights(b, width, p.alpha, x.device)
        x01, low, scale = to_unit(x)
        chains = x01.repeat(width, 1, 1, 1)  # row k * B + i: chain k of image i
        depth = (torch.randint(1, 4, (len(chains),), device=x.device) if p.mixture_depth < 0
                 else torch.full((len(chains),), p.mixture_depth, device=x.device))
        for step in range(int(depth.max())):
            choice = torch.randint(len(self.op_names), (len(chains),), device=x.device)
            chains = augmix_step(chains, self.op_names, choice, depth > step, float(p.severity))
        chains = from_unit(chains, low.repeat(width, 1, 1, 1), scale.repeat(width, 1, 1, 1))
        return augmix_mix(x, chains.view(width, *x.shape), w, m).to(x.dtype)


# --------------------------------------------------------------------------------- batches and the JSD term


@dataclasses.dataclass
class ConsistencyViews:
    """Augmented views of a batch that the training loss compares with the clean batch (AugMix's JSD)."""

    views: tuple[torch.Tensor, ...]
    weight: float


def jensen_shannon(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """AugMix's consistency term: (1/n) sum_v KL(p_v || M), M = clamp(mean_v p_v, 1e-7, 1), p_v = softmax of each
    view's logits [B, C]; KL summed over classes and averaged over the batch (``kl_div(..., 'batchmean')``)."""
    probs = [F.softmax(z, dim=-1) for z in logits]
    log_mixture = torch.clamp(torch.stack(probs).mean(0), JS_CLAMP, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)


class BatchAugmenter:
    """The scenario's ``client.augment`` list applied in order to a training batch (a ``clients.base.Batch``).

    An augmix entry with jsd keeps the batch clean and attaches two AugMix views of it (``batch.consistency``);
    the entries after it augment the clean batch and each view independently."""

    def __init__(self, augmentations: list[Augmentation]):
        self.augmentations = augmentations

    def __call__(self, batch: Any) -> Any:
        x, views, weight = batch.x, (), 0.0
        for aug in self.augmentations:
            if isinstance(aug, AugMix) and aug.params.jsd:
                views, weight = (aug(x), aug(x)), aug.params.lam
            else:
                x, views = aug(x), tuple(aug(v) for v in views)
        consistency = ConsistencyViews(views, weight) if views else None
        return dataclasses.replace(batch, x=x, consistency=consistency)


def build_augmenter(specs: list[ComponentSpec | str], input_shape: tuple[int, ...]) -> BatchAugmenter | None:
    """The resolved ``client.augment`` list as a ``BatchAugmenter`` (None when empty). Raises ScenarioError
    naming ``client.augment.<i>`` when the loaded examples are not images or kornia is missing."""
    if not specs:
        return None
    augmentations, problems = [], []
    for i, ref in enumerate(specs):
        spec = ComponentSpec(name=ref) if isinstance(ref, str) else ref
        cls = AUGMENTATIONS.get(spec.name)
        try:
            augmentations.append(cls(cls.Params.model_validate(spec.params()), input_shape))
        except ValueError as exc:
            problems.append((f"client.augment.{i}", f"{spec.name}: {exc}"))
        except ImportError:
            problems.append((f"client.augment.{i}", f"{spec.name} needs kornia, which is not installed: "
                                                    f"{INSTALL_HINT}"))
    if problems:
        raise ScenarioError(problems)
    return BatchAugmenter(augmentations)
