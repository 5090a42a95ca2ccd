"""Fourier-Mixup: mix an image's amplitude spectrum with another domain's, keeping its phase."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedshift.augment import declared_input_shape
from fedshift.core.params import ComponentParams
from fedshift.nets.models import ModelOutput

from .base import CLIENT_STRATEGIES, Batch, ClientTrainer, TrainContext
from .mixup import mixup_partners
from .utils import device_generator

BANK = "fourier_mixup.amp."  # + mode: amplitude spectra [N, C, H, W] (client -> server -> clients)


def image_problem(shape) -> str | None:
    """Why examples of this shape are not images [C, H, W] (None if they are)."""
    if shape is not None and len(tuple(shape)) == 3:
        return None
    return (f"client strategy 'fourier_mixup' mixes the amplitude spectra of images and needs image examples "
            f"[C, H, W], got examples of shape {None if shape is None else list(shape)}; use another client "
            "strategy for this dataset")


def low_frequency_window(h: int, w: int, ratio: float, device=None) -> torch.Tensor:
    """[H, W] mask of the centred (fftshift-ed) low-frequency square mixed: side int(H sqrt(ratio)) by
    int(W sqrt(ratio)), starting at H // 2 - side // 2 (Xu et al.'s crop), in fftshift-ed coordinates."""
    hc, wc = int(h * math.sqrt(ratio)), int(w * math.sqrt(ratio))
    h0, w0 = h // 2 - hc // 2, w // 2 - wc // 2
    mask = torch.zeros(h, w, device=device)
    mask[h0:h0 + hc, w0:w0 + wc] = 1.0
    return mask


def amplitude(x: torch.Tensor) -> torch.Tensor:
    """|FFT2(x)| over the last two dimensions."""
    return torch.fft.fft2(x).abs()


def amplitude_mix(x: torch.Tensor, partner_amp: torch.Tensor, lam: torch.Tensor, ratio: float) -> torch.Tensor:
    """Images [B, C, H, W] whose amplitude spectrum, inside the centred low-frequency window of area share
    ``ratio``, is (1 - lam_i) |F(x_i)| + lam_i A_i (A = ``partner_amp``), with the phase of x_i kept:
    x~ = Re IFFT2(A~ exp(i angle F(x)))."""
    spectrum = torch.fft.fft2(x)
    amp, phase = spectrum.abs(), spectrum.angle()
    mask = torch.fft.ifftshift(low_frequency_window(x.shape[-2], x.shape[-1], ratio, x.device), dim=(-2, -1))
    weight = lam.to(x.dtype)[:, None, None, None] * mask
    mixed = amp + weight * (partner_amp - amp)
    return torch.fft.ifft2(torch.polar(mixed, phase)).real.to(x.dtype)


class FourierMixupParams(ComponentParams):
    alpha: float = Field(1.0, ge=0, le=1, description="lambda ~ U(0, alpha) per example: the partner's share of "
                                                      "the mixed amplitude (Xu et al.: 1.0)")
    ratio: float = Field(1.0, gt=0, le=1, description="area share of the centred low-frequency window whose "
                                                      "amplitude is mixed (1.0: the whole spectrum; Xu et al.: 1.0)")
    keep_original: bool = Field(True, description="loss on the original and the mixed images (their mean); "
                                                   "false: on the mixed images only (FedDG_Benchmark)")
    bank_size: int = Field(8, ge=0, description="amplitude spectra per mode a client sends to the server each round, "
                                                "for single-mode clients' partners (0: none are shared)")
    server_bank: int = Field(64, ge=1, description="most amplitude spectra per mode the server broadcasts")


@CLIENT_STRATEGIES.register
class FourierMixup(ClientTrainer):
    """Fourier-Mixup: train on images whose amplitude spectrum is mixed with another domain's (phase kept).

    Xu, Zhang, Zhang, Wang, Tian, "A Fourier-based Framework for Domain Generalization", CVPR 2021 (amplitude
    mix, without its co-teacher consistency); the amplitude bank shared through the server follows Liu et al.,
    "FedDG: Federated Domain Generalization on Medical Image Segmentation via Episodic Learning in Continuous
    Frequency Space", CVPR 2021, as FedDG_Benchmark's (inouye-lab) ``FourierMixup``.

    Per example x_i: a partner amplitude A_i (below), lambda_i ~ U(0, alpha), and x~_i = Re IFFT2(A~_i exp(i
    phase(F x_i))) with A~_i = (1 - lambda_i) |F x_i| + lambda_i A_i inside the centred low-frequency window of
    area share ``ratio`` and |F x_i| outside (``amplitude_mix``; per channel). The phase carries the semantics,
    the amplitude the style. loss = (task(x) + task(x~)) / 2 (``keep_original``; else task(x~)), both the server
    algorithm's task loss with the original labels.

    Partners (domains are modes): D1, the batch holds examples of another mode: the partner is one of them,
    uniformly (the amplitude of that image). D3, no other mode in the batch (single-mode clients): a spectrum
    of another mode from the server's amplitude bank, uniformly: every client sends ``bank_size`` amplitude
    spectra per mode it holds (of random examples of its data, ``fourier_mixup.amp.<mode>``), the server keeps up
    to ``server_bank`` per mode (in the order of the replies) and broadcasts them to the next round's clients
    (one round stale). In round 0, or with bank_size 0, such examples mix with a random example of the batch
    (its own mode: a within-domain amplitude perturbation). Privacy: amplitude spectra of individual images leave
    the client (FedDG's premise: the amplitude holds low-level style, not the image content). Uplink: bank_size
    C H W floats per mode; downlink: up to server_bank C H W per mode.

    Image inputs only: a scenario whose dataset declares examples that are not [C, H, W] fails validation, and
    building the model for non-image data raises a ValueError naming the method.

    Parameters: alpha (1.0) and ratio (1.0) as Xu et al.'s defaults (FedDG_Benchmark instead draws a random
    window size and mixing ratio); keep_original (True: Xu et al. train on both), bank_size (8), server_bank (64).

    Deviations: no co-teacher consistency loss (Xu et al.'s FACT); mixed images are not clipped (fedshift's
    inputs are not in a fixed range); the loss on the two halves is their mean rather than their sum, so the
    step size stays ERM's.
    """

    name = "fourier_mixup"
    Params = FourierMixupParams

    @classmethod
    def check_scenario(cls, params, scenario):
        for mode in scenario.mode_names:
            spec = scenario.dataset_of_mode(mode)
            shape = declared_input_shape(spec)
            if shape is not None and image_problem(shape) is not None:
                return [("client.strategy", f"mode {mode!r} (dataset {spec.name!r}): {image_problem(shape)}")]
        return []

    def prepare_model(self, model):
        problem = image_problem(model.input_shape)
        if problem is not None:
            raise ValueError(problem)

    def train(self, ctx: TrainContext) -> dict[str, float]:
        problem = image_problem(tuple(ctx.data.x.shape[1:]))
        if problem is not None:
            raise ValueError(problem)
        self._gen = device_generator(ctx)
        own = set(ctx.data.domains)
        modes = sorted(int(k[len(BANK):]) for k in ctx.server if k.startswith(BANK))
        banks = [(m, ctx.server[f"{BANK}{m}"]) for m in modes]
        if banks:
            self._bank = torch.cat([b for _, b in banks]).to(ctx.device, ctx.data.x.dtype)
            self._bank_mode = torch.cat([torch.full((len(b),), m, dtype=ctx.data.domain.dtype)
                                         for m, b in banks]).to(ctx.device)
        else:
            self._bank = self._bank_mode = None
        metrics = super().train(ctx)
        if self.params.bank_size > 0:
            for mode in sorted(own):
                idx = torch.nonzero(ctx.data.domain == mode).flatten()
                pick = idx[torch.randperm(len(idx), generator=self._gen, device=idx.device)[:self.params.bank_size]]
                ctx.stats[f"{BANK}{mode}"] = amplitude(ctx.data.x[pick]).detach().cpu()
        return metrics

    def draw(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's lambda and partner amplitude spectrum."""
        b = len(batch.y)
        lam = torch.rand(b, generator=self._gen, device=batch.x.device) * self.params.alpha
        partner = mixup_partners(batch.domain, self._gen, inter_domain=True)
        amp = amplitude(batch.x)
        partner_amp = amp[partner]
        if self._bank is not None:
            in_batch = (batch.domain[:, None] != batch.domain[None, :]).any(1)
            other = self._bank_mode[None, :] != batch.domain[:, None]
            scores = torch.rand(b, len(self._bank_mode), generator=self._gen, device=batch.x.device)
            pick = scores.masked_fill(~other, -1.0).argmax(1)
            use_bank = ~in_batch & other.any(1)
            partner_amp = torch.where(use_bank[:, None, None, None], self._bank[pick], partner_amp)
        return lam, partner_amp

    def loss(self, batch: Batch, ctx: TrainContext):
        lam, partner_amp = self.draw(batch)
        mixed = amplitude_mix(batch.x, partner_amp, lam, self.params.ratio)
        if not self.params.keep_original:
            task = ctx.loss(ctx.model(mixed), batch)
            return task, {"loss": task}
        b = len(batch.y)
        out = ctx.model(torch.cat([batch.x, mixed]))
        original = ctx.loss(ModelOutput(out.logits[:b], out.features[:b]), batch)
        augmented = ctx.loss(ModelOutput(out.logits[b:], out.features[b:]), batch)
        objective = 0.5 * (original + augmented)
        return objective, {"loss": original, "fourier_mixup.mixed_loss": augmented}

    def aggregate_stats(self, server_round, stats):
        out: dict[str, list[torch.Tensor]] = {}
        for _, _, client in stats:
            for key, value in client.items():
                if key.startswith(BANK):
                    out.setdefault(key, []).append(value)
        return {key: torch.cat(parts)[:self.params.server_bank] for key, parts in out.items()}
