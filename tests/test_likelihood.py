"""The likelihood (bits/dim) against closed forms, and end to end through a real diffusers UNet.

The known answer: for data x0 ~ N(mu, S) the noised marginal is N(gamma_t mu, gamma_t^2 S + sigma_t^2 I),
so the exact noise prediction is eps(x, t) = sigma_t (gamma_t^2 S + sigma_t^2 I)^{-1} (x - gamma_t mu). With
that "model" the probability-flow log density must equal the Gaussian log density at t_min, up to the
estimator's stated noise. S is a full (non-diagonal) covariance, so even Rademacher probes are noisy.
"""

from __future__ import annotations

import math

import pytest
import torch

from retrack.likelihood import (
    NLLSettings, VPSchedule, bits_per_dim, dequantise, flow_log_likelihood, draw_probes, image_likelihood,
    model_likelihoods,
)

SHAPE = (1, 4, 4)  # D = 16
D = 16


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Song et al.'s VP schedule with beta_min 0.1, beta_max 20, written out here independently."""
    return torch.exp(-0.1 * t - 0.5 * 19.9 * t * t)


def gaussian(seed: int = 0, mean_scale: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    cov = 0.6 * a @ a.T + 0.1 * torch.eye(D, dtype=torch.float64)  # eigenvalues ~0.1..2.5, far from I
    return mean_scale * torch.randn(D, generator=g, dtype=torch.float64), cov


def marginal(mu: torch.Tensor, cov: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ab = alpha_bar(t)
    return ab.sqrt() * mu, ab * cov + (1 - ab) * torch.eye(D, dtype=torch.float64)


def exact_eps(mu: torch.Tensor, cov: torch.Tensor):
    """The noise prediction that is exact for N(mu, cov), called as the likelihood code calls a model."""
    def eps(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows = []
        for row, label in zip(x.flatten(1), labels):
            t = label / 999  # the label is t * (N - 1)
            mean_t, cov_t = marginal(mu, cov, t)
            rows.append((1 - alpha_bar(t)).sqrt() * torch.linalg.solve(cov_t, row - mean_t))
        return torch.stack(rows).view_as(x)
    return eps


def log_normal(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x.flatten(1))


def test_schedule_is_the_ddpm_linear_betas_in_continuous_time():
    from diffusers import DDPMScheduler

    schedule = VPSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    assert (schedule.beta_min, schedule.beta_max, schedule.num_train_timesteps) == pytest.approx((0.1, 20.0, 1000))
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(schedule.alpha_bar(t), alpha_bar(t))
    assert torch.allclose(schedule.sigma(t) ** 2 + schedule.alpha_bar(t), torch.ones(3, dtype=torch.float64))
    # The discrete DDPM noise level at step n is the continuous one at t = n / (N - 1), within 1 %
    # from n = 50 on (below, the discrete one leads by about a step: label 0 has sigma 0.010)
    discrete_sigma = (1 - DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()).sqrt()
    n = torch.tensor([50, 100, 500, 900, 999])
    assert torch.allclose(schedule.sigma(n.double() / 999), discrete_sigma[n], rtol=0.01)
    for config in (dict(beta_schedule="squaredcos_cap_v2"), dict(prediction_type="v_prediction")):
        with pytest.raises(ValueError, match="linear beta schedule|predicts the noise"):
            VPSchedule.from_scheduler(DDPMScheduler(**config))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_flow_log_density_matches_the_gaussian_closed_form_within_the_stated_error(probe):
    mu, cov = gaussian()
    settings = NLLSettings(repeats=24, probe=probe)
    g = torch.Generator().manual_seed(1)
    x0 = torch.distributions.MultivariateNormal(mu, cov).sample((1,)).expand(settings.repeats, D)  # one point
    x = x0.reshape(settings.repeats, *SHAPE).clone()
    probes = draw_probes(tuple(x.shape), probe, g, torch.float64)
    flow = flow_log_likelihood(exact_eps(mu, cov), x, VPSchedule(), settings, probes)

    t_min, t_one = torch.tensor(settings.t_min, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    exact = log_normal(x[:1], *marginal(mu, cov, t_min))
    # The code takes N(0, I) as the density at t = 1; the true one is N(gamma_1 mu, ...). Correct
    # for that difference exactly at the end point the flow reached.
    prior_gap = log_normal(flow.latent, *marginal(mu, cov, t_one)) - log_normal(flow.latent, torch.zeros(D, dtype=torch.float64),
                                                                                torch.eye(D, dtype=torch.float64))
    estimates = flow.log_p + prior_gap
    std_error = estimates.std() / math.sqrt(len(estimates))
    assert std_error > 1e-3, "the probes are noisy for a non-diagonal covariance: the check is not trivial"
    assert abs(estimates.mean() - exact) < 3 * std_error + 1e-3, (estimates.mean(), exact, std_error)
    assert 20 < flow.evaluations < 2000
    # The end point is the Gaussian flow's: x_1 = gamma_1 mu + C_1^{1/2} C_min^{-1/2} (x - gamma_min mu)
    evals, vecs = torch.linalg.eigh(cov)
    scale = lambda t: (alpha_bar(t) * evals + 1 - alpha_bar(t)).sqrt()  # noqa: E731
    expected_latent = marginal(mu, cov, t_one)[0] + vecs @ ((scale(t_one) / scale(t_min)) * (vecs.T @ (x0[0] - marginal(mu, cov, t_min)[0])))
    assert torch.allclose(flow.latent[0].flatten(), expected_latent, atol=1e-3)


def test_bits_per_dim_of_dequantised_8bit_data_matches_the_closed_form():
    """Whole pipeline: 8-bit levels -> uniform dequantisation -> flow -> bits/dim with the +7 offset.

    Exact value: E_u[-log N(x; 0, C_min)] / (D ln 2) + 7 with x = (k + u) / 128 - 1, i.e.
    [D/2 log 2 pi + 1/2 log det C_min + 1/2 (xbar^T P xbar + tr(P) / (12 * 128^2))] / (D ln 2) + 7,
    xbar = (k + 1/2) / 128 - 1, P = C_min^{-1}. The mean is 0 here, which makes N(0, I) at t = 1 exact
    to within D * alpha_bar(1) * |eigenvalue - 1| ~ 2e-3 nats (1e-4 bits/dim).
    """
    _, cov = gaussian()
    mu = torch.zeros(D, dtype=torch.float64)
    levels = torch.tensor([[(37 * i) % 256 for i in range(D)]]).reshape(SHAPE)
    image = levels.double() / 127.5 - 1
    settings = NLLSettings(repeats=16)
    result = image_likelihood(exact_eps(mu, cov), VPSchedule(), image, settings)

    _, cov_min = marginal(mu, cov, torch.tensor(settings.t_min, dtype=torch.float64))
    precision = torch.linalg.inv(cov_min)
    xbar = ((levels.double() + 0.5) / 128 - 1).flatten()
    expected_nats = (0.5 * D * math.log(2 * math.pi) + 0.5 * torch.logdet(cov_min)
                     + 0.5 * (xbar @ precision @ xbar + precision.trace() / (12 * 128 ** 2)))
    expected = float(expected_nats / (D * math.log(2)) + 7)
    assert len(result.repeats) == 16 and result.std_error > 0
    assert abs(result.bits_per_dim - expected) < 3 * result.std_error + 2e-4, (result, expected)


def test_offsets_uniform_data_is_eight_bits():
    """A density uniform on [-1, 1)^D (log p = -D log 2) is 8 bits per 8-bit value."""
    assert float(bits_per_dim(torch.tensor([-D * math.log(2)]), D)) == pytest.approx(8.0)
    g = torch.Generator().manual_seed(0)
    x = dequantise(torch.tensor([[0, 255]]), 1000, g, torch.float64)
    assert x.min() >= -1 and x.max() < 1 and x[:, 0, 0].max() < -1 + 1 / 128 and x[:, 0, 1].min() >= 1 - 1 / 128


def test_settings_are_checked():
    for bad in (dict(repeats=1), dict(probe="cauchy"), dict(rtol=0.0), dict(t_min=0.5)):
        with pytest.raises(ValueError):
            NLLSettings(**bad).validate()


def test_real_tiny_unet_end_to_end(tiny_pixel_model):
    """Through load_backend and a real UNet2DModel: finite bits/dim with noise, reproducible by seed,
    and the same draws for the same image whatever model is asked."""
    from retrack.backends import load_backend

    backend = load_backend(tiny_pixel_model)
    images = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    settings = NLLSettings(rtol=1e-2, atol=1e-2, repeats=2, t_min=1e-3)  # a random UNet: loose, to stay fast
    seen = []
    first = model_likelihoods(backend, images, settings, on_image=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)]
    assert all(math.isfinite(r.bits_per_dim) and r.std_error > 0 and r.evaluations > 0 for r in first)
    again = model_likelihoods(backend, images[:1], settings)
    assert again[0].repeats == pytest.approx(first[0].repeats, rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        model_likelihoods(backend, torch.zeros(1, 3, 8, 8), settings)


def test_nll_command_prints_bits_per_dim_with_noise(tiny_pixel_model, tmp_path, capsys):
    from PIL import Image

    from retrack.cli import main

    for i in range(2):
        Image.fromarray(((torch.arange(64).reshape(8, 8) * (i + 1)) % 256).byte().numpy()).save(tmp_path / f"{i}.png")
    code = main(["nll", "--model", str(tiny_pixel_model), "--images", str(tmp_path), "--rtol", "0.1", "--atol", "0.1",
                 "--repeats", "2", "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0 and "rtol 0.1 atol 0.1, 2 rademacher probes" in printed.err
    lines = printed.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["0.png", "1.png"]
    assert all(" ± " in line and "bits/dim (2 repeats" in line for line in lines)
    assert main(["nll", "--model", str(tiny_pixel_model), "--repeats", "1"]) == 2
    assert "at least 2 repeats" in capsys.readouterr().err


def test_benchmark_likelihood_table_on_the_builtin_model(tmp_path):
    import json

    from retrack import bench, builtin

    if not builtin.available():
        pytest.skip("the built-in model is not built")
    settings = bench.BenchSettings(methods=("pretrained", "retrack"), steps=1, batch_size=4, device="cpu")
    rows = bench.run_likelihood(settings, tmp_path, NLLSettings(rtol=0.1, atol=0.1, repeats=2), n_retain=1,
                                log=lambda line: None)
    assert [(row.model, row.role) for row in rows] == [("pretrained", "forget"), ("pretrained", "retain"),
                                                       ("retrack", "forget"), ("retrack", "retain")]
    assert rows[0].image == "t-shirt" and rows[1].image == rows[3].image
    table = (tmp_path / "nll.md").read_text()
    assert "| image | pretrained | retrack |" in table and "| t-shirt (forget) |" in table
    stored = json.loads((tmp_path / "nll.json").read_text())
    assert stored["meta"]["likelihood"]["rtol"] == 0.1 and len(stored["rows"]) == 4
    assert len(stored["rows"][0]["result"]["repeats"]) == 2
