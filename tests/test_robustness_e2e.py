"""Every robustness option of the model, the client and the evaluation runs a short federation end to end
through Flower and Ray, one run per option and one with all of them on together.

All runs share one Ray runtime with the session's other end-to-end runs (``ray_outcomes`` in tests/conftest.py).
"""

import math

import pytest

pytestmark = pytest.mark.e2e

ROUNDS = 2
BASE = [f"rounds={ROUNDS}", "clients_per_round=2", "data.clients_per_mode=4", "client.local_epochs=1",
        "client.max_steps=2", "eval.batch_size=64", "output.tensorboard=false", "output.save_model=false"]
CNN = "model={architecture: cnn, channels: [8, 8], feature_dim: 16, norm: batch%s}"
RUNS = {
    "selfnorm": [CNN % ", modules: [selfnorm]"],
    "crossnorm": [CNN % ", modules: [{name: crossnorm, p: 1.0}]"],
    "dsu": [CNN % ", modules: [dsu]"],
    "padding": [CNN % ", padding: reflect"],
    "color_jitter": [CNN % "", "client.augment=[{name: color_jitter, brightness: 0.3}]"],
    "randaugment": [CNN % "", "client.augment=[randaugment]"],
    "autoaugment": [CNN % "", "client.augment=[autoaugment]"],
    "augmix": [CNN % "", "client.augment=[augmix]"],
    "augmix_jsd": [CNN % "", "client.augment=[{name: augmix, jsd: true}]"],
    "bn_adapt": [CNN % "", "eval.adapt=bn_adapt"],
    "tent": [CNN % "", "eval.adapt=tent"],
    "ood": ["eval.ood=[msp, maxlogit]", "strategy.name=fedtkm"],
    "select_maxlogit": ["eval.select=maxlogit", "strategy.name=fedtkm"],
    "all": [CNN % ", padding: reflect, modules: [selfnorm, {name: crossnorm, p: 1.0}, dsu]",
            "client.augment=[color_jitter, {name: augmix, jsd: true}]", "eval.adapt=tent",
            "eval.ood=[msp, maxlogit]", "eval.select=maxlogit", "strategy.name=fedtkm"],
}


RAY_RUNS = {f"robustness-{name}": [*BASE, *extra] for name, extra in RUNS.items()}


def test_every_robustness_option_runs_through_flower_and_ray(ray_outcomes):
    outcomes = {name: ray_outcomes[f"robustness-{name}"] for name in RUNS}
    errors = {n: repr(o) for n, (o, _) in outcomes.items() if isinstance(o, BaseException)}
    assert not errors, errors
    for name, (result, sim) in outcomes.items():
        assert result.summary["rounds"] == ROUNDS and result.summary["clients_failed"] == 0, (name, sim.failures)
        assert all(math.isfinite(r["train/loss"]) for r in result.rows), name
        final = result.summary["final"]
        assert 0 <= final["eval/all/accuracy"] <= 1, name
        if "eval.ood=[msp, maxlogit]" in RUNS[name]:
            for k in (0, 1):
                for score in ("msp", "maxlogit"):
                    assert 0 <= result.rows[-1][f"eval/branch{k}/{score}_auroc"] <= 1, (name, k, score)
