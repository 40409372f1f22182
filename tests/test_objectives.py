"""The losses against hand computations and closed forms on tiny tensors (METHOD.md)."""

import math

import numpy as np
import pytest
import torch

from retrack.objectives import (
    METHODS, Batch, NoiseSchedule, Params, erasediff, erasediff_combine, neggrad, predict_noise, retrack, retrack_targets,
    retrack_unlearn_loss, siss, siss_combine, siss_weights, sum_sq, vanilla,
)



@pytest.fixture(autouse=True)
def float64_default():
    """Closed forms are checked in float64; restore the default afterwards for other tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def linear_schedule(T: int = 1000) -> NoiseSchedule:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1 - betas, 0))


class Recorder:
    """A deterministic 'network' eps(x_t, t) = 0.3 x_t + 0.001 t, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return 0.3 * x_t + 0.001 * t.view(-1, 1, 1, 1).to(x_t.dtype)


def make_batch(b=3, k=4, shape=(1, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(forget=torch.randn(b, *shape, generator=g), neighbours=torch.randn(b, k, *shape, generator=g),
                 retain=torch.randn(b, *shape, generator=g))


def replay_draws(batch, schedule, seed, forget_first=True):
    """Re-draw t, eps exactly as `_noised` does (forget branch then retain branch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x0 in ([batch.forget, batch.retain] if forget_first else [batch.retain]):
        t = schedule.sample_t(x0.shape[0], g)
        eps = torch.randn(x0.shape, generator=g)
        gamma, sigma = schedule.gamma_sigma(t, x0)
        out.append((t, eps, gamma, sigma, gamma * x0 + sigma * eps))
    return out


# ----------------------------------------------------------------------------- ReTrack
def test_retrack_unlearn_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(1)
    B, K, D = 2, 3, 5
    x_t, nbrs, pred = torch.randn(B, 1, 1, D, generator=g), torch.randn(B, K, 1, 1, D, generator=g), torch.randn(B, 1, 1, D, generator=g)
    gamma, sigma = torch.tensor([0.9, 0.6]).view(-1, 1, 1, 1), torch.tensor([math.sqrt(1 - 0.81), 0.8]).view(-1, 1, 1, 1)
    v, pi = retrack_targets(x_t, nbrs, gamma, sigma)
    loss = retrack_unlearn_loss(pred, v, pi)
    xn, nn_, pn = x_t.numpy().reshape(B, D), nbrs.numpy().reshape(B, K, D), pred.numpy().reshape(B, D)
    for b in range(B):
        gb, sb = gamma[b].item(), sigma[b].item()
        vs = [(xn[b] - gb * nn_[b, k]) / sb for k in range(K)]
        logits = np.array([-0.5 * np.sum(v_ ** 2) for v_ in vs])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        expected = sum(w[k] * np.sum((pn[b] - vs[k]) ** 2) for k in range(K))
        assert loss[b].item() == pytest.approx(expected, rel=1e-10)
        np.testing.assert_allclose(pi[b].numpy(), w, rtol=1e-10)


def test_retrack_minimiser_with_whole_retain_set_is_posterior_mean_noise():
    """K = |A_r|: argmin_e sum_k pi_k |e - v_k|^2 = sum_a w(a|x_t) (x_t - gamma a) / sigma."""
    g = torch.Generator().manual_seed(2)
    retain = torch.randn(6, 1, 2, 2, generator=g)
    x_t = torch.randn(1, 1, 2, 2, generator=g) * 0.5
    gamma, sigma = torch.tensor(0.7).view(1, 1, 1, 1), torch.tensor(math.sqrt(1 - 0.49)).view(1, 1, 1, 1)
    v, pi = retrack_targets(x_t, retain.unsqueeze(0), gamma, sigma)
    # the posterior-mean noise of METHOD.md, written independently
    d2 = ((x_t - gamma * retain) ** 2).flatten(1).sum(1)
    w = torch.softmax(-d2 / (2 * sigma.flatten() ** 2), 0)
    eps_star = (w.view(-1, 1, 1, 1) * (x_t - gamma * retain) / sigma).sum(0, keepdim=True)
    # minimise the ReTrack loss over the prediction by gradient descent (it is a convex quadratic)
    pred = torch.zeros_like(x_t, requires_grad=True)
    opt = torch.optim.SGD([pred], lr=0.25)
    for _ in range(200):
        opt.zero_grad()
        retrack_unlearn_loss(pred, v, pi).sum().backward()
        opt.step()
    torch.testing.assert_close(pred.detach(), eps_star, rtol=1e-8, atol=1e-8)


def test_weighted_sum_equals_distance_to_weighted_mean_plus_constant():
    g = torch.Generator().manual_seed(3)
    x_t, nbrs = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 5, 1, 3, 3, generator=g)
    gamma, sigma = torch.full((2, 1, 1, 1), 0.8), torch.full((2, 1, 1, 1), 0.6)
    v, pi = retrack_targets(x_t, nbrs, gamma, sigma)
    v_bar = (pi.view(2, 5, 1, 1, 1) * v).sum(1)
    gaps = []
    for seed in (4, 5, 6):
        e = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(seed))
        gaps.append(retrack_unlearn_loss(e, v, pi) - sum_sq(e, v_bar))
    torch.testing.assert_close(gaps[0], gaps[1])
    torch.testing.assert_close(gaps[0], gaps[2])


def test_no_gradient_flows_through_the_weights():
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(1, 1, 2, 2, generator=g, requires_grad=True)
    nbrs = torch.randn(1, 3, 1, 2, 2, generator=g)
    gamma, sigma = torch.full((1, 1, 1, 1), 0.9), torch.full((1, 1, 1, 1), 0.4)
    v, pi = retrack_targets(x_t, nbrs, gamma, sigma)
    assert not pi.requires_grad
    pred = torch.zeros(1, 1, 2, 2)
    (grad,) = torch.autograd.grad(retrack_unlearn_loss(pred, v, pi).sum(), x_t)
    # with pi constant, d/dx sum_k pi_k |0 - v_k|^2 = sum_k pi_k 2 v_k / sigma
    expected = (pi.view(1, 3, 1, 1, 1) * 2 * v.detach() / sigma.unsqueeze(1)).sum(1)
    torch.testing.assert_close(grad, expected)


def test_retrack_objective_matches_formula_with_independent_branches():
    sched, batch, params = linear_schedule(), make_batch(), Params(lam=0.3)
    net = Recorder()
    terms = retrack(net, batch, sched, torch.Generator().manual_seed(11), params)
    (t_u, _, g_u, s_u, x_u), (t_r, eps_r, _, _, x_r) = replay_draws(batch, sched, 11)
    # On the CPU one network call per branch (on a GPU one fused call: see test_fused_prediction_...)
    assert [(torch.equal(x, xx), torch.equal(t, tt)) for (x, t), (xx, tt) in zip(net.calls, [(x_u, t_u), (x_r, t_r)])] \
        == [(True, True), (True, True)]
    v, pi = retrack_targets(x_u, batch.neighbours, g_u, s_u)
    unlearn = retrack_unlearn_loss(net(x_u, t_u, None), v, pi).mean()
    retain = sum_sq(net(x_r, t_r, None), eps_r).mean()
    torch.testing.assert_close(terms.unlearn, unlearn)
    torch.testing.assert_close(terms.retain, retain)
    torch.testing.assert_close(terms.loss, 0.3 * unlearn + 0.7 * retain)
    assert not torch.equal(t_u, t_r)  # the branches draw their own t


def test_fused_prediction_equals_one_call_per_group():
    net = Recorder()
    xs, ts = [torch.randn(3, 1, 2, 2), torch.randn(2, 1, 2, 2)], [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    fused = predict_noise(net, xs, ts, [None, None], fuse=True)
    separate = predict_noise(net, xs, ts, [None, None], fuse=False)
    assert len(net.calls) == 3  # one fused call, then one per group
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b)


def test_lambda_zero_is_vanilla_and_lambda_one_is_pure_unlearning():
    sched, batch = linear_schedule(), make_batch()
    zero = retrack(Recorder(), batch, sched, torch.Generator().manual_seed(5), Params(lam=0.0))
    one = retrack(Recorder(), batch, sched, torch.Generator().manual_seed(5), Params(lam=1.0))
    torch.testing.assert_close(zero.loss, zero.retain)
    torch.testing.assert_close(one.loss, one.unlearn)
    # the retain term is exactly the plain denoising loss on the retain rows
    (_, _, _, _, _), (t_r, eps_r, _, _, x_r) = replay_draws(batch, sched, 5)
    torch.testing.assert_close(zero.loss, sum_sq(Recorder()(x_r, t_r, None), eps_r).mean())


# ----------------------------------------------------------------------------- baselines
def test_vanilla_and_neggrad_match_their_formulas():
    sched, batch = linear_schedule(), make_batch()
    terms = vanilla(Recorder(), batch, sched, torch.Generator().manual_seed(8), Params())
    ((t, eps, _, _, x),) = replay_draws(batch, sched, 8, forget_first=False)
    torch.testing.assert_close(terms.loss, ((0.3 * x + 0.001 * t.view(-1, 1, 1, 1) - eps) ** 2).sum((1, 2, 3)).mean())
    terms = neggrad(Recorder(), batch, sched, torch.Generator().manual_seed(8), Params())
    (t, eps, _, _, x), _ = replay_draws(batch, sched, 8)
    torch.testing.assert_close(terms.loss, -((0.3 * x + 0.001 * t.view(-1, 1, 1, 1) - eps) ** 2).sum((1, 2, 3)).mean())


def test_erasediff_forget_target_is_uniform_noise():
    sched, batch = linear_schedule(), make_batch()
    terms = erasediff(Recorder(), batch, sched, torch.Generator().manual_seed(9), Params())
    g = torch.Generator().manual_seed(9)
    t = sched.sample_t(3, g)
    eps = torch.randn(batch.forget.shape, generator=g)
    gamma, sigma = sched.gamma_sigma(t, batch.forget)
    u = torch.rand(batch.forget.shape, generator=g)
    x = gamma * batch.forget + sigma * eps
    assert terms.loss is None
    torch.testing.assert_close(terms.unlearn, sum_sq(Recorder()(x, t, None), u).mean())
    assert 0 <= u.min() and u.max() < 1


def test_erasediff_projection():
    eta = 1e-3
    # aligned gradients: phi = max(eta - <g_r, g_f>/|g_f|^2, 0) = 0, g = g_r
    g = erasediff_combine([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])], eta)
    torch.testing.assert_close(g[0], torch.tensor([1.0, 0.0]))
    # opposed: phi = eta + 1/2, and the result has at least eta alignment with g_f
    g_r, g_f = [torch.tensor([-1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([1.0, 1.0]), torch.tensor([-2.0])]
    phi = eta - (-1.0 - 4.0) / 6.0
    g = erasediff_combine(g_r, g_f, eta)
    torch.testing.assert_close(g[0], g_r[0] + phi * g_f[0])
    torch.testing.assert_close(g[1], g_r[1] + phi * g_f[1])
    dot = sum((a * b).sum() for a, b in zip(g, g_f))
    assert dot.item() == pytest.approx(eta * 6.0)


def test_siss_weights_match_formula_and_stay_finite():
    g = torch.Generator().manual_seed(10)
    z, xr, au = (torch.randn(4, 1, 2, 2, generator=g) * 0.3 for _ in range(3))
    gamma, sigma = torch.full((4, 1, 1, 1), 0.8), torch.full((4, 1, 1, 1), 0.6)
    w_r, w_u = siss_weights(z, xr, au, gamma, sigma, 0.5)
    d_r = ((z - gamma * xr) ** 2).sum((1, 2, 3)) / (2 * 0.36)
    d_u = ((z - gamma * au) ** 2).sum((1, 2, 3)) / (2 * 0.36)
    torch.testing.assert_close(w_r, 1 / (0.5 + 0.5 * torch.exp(d_r - d_u)))
    torch.testing.assert_close(w_u, 1 / (0.5 * torch.exp(d_u - d_r) + 0.5))
    # far-apart points at small sigma: the naive exp overflows, the weights must not
    w_r, w_u = siss_weights(z, xr + 50, au, gamma, torch.full((4, 1, 1, 1), 1e-2), 0.5)
    assert torch.isfinite(w_r).all() and torch.isfinite(w_u).all()
    torch.testing.assert_close(w_r, torch.zeros(4))
    torch.testing.assert_close(w_u, torch.full((4,), 2.0))


def test_siss_objective_matches_formula():
    sched, batch, params = linear_schedule(), make_batch(b=4), Params(siss_lambda=0.5)
    terms = siss(Recorder(), batch, sched, torch.Generator().manual_seed(12), params)
    g = torch.Generator().manual_seed(12)
    t = sched.sample_t(4, g)
    eps = torch.randn(batch.forget.shape, generator=g)
    take = torch.rand(4, generator=g) < 0.5
    gamma, sigma = sched.gamma_sigma(t, batch.forget)
    z = gamma * torch.where(take.view(-1, 1, 1, 1), batch.forget, batch.retain) + sigma * eps
    pred = Recorder()(z, t, None)
    w_r, w_u = siss_weights(z, batch.retain, batch.forget, gamma, sigma, 0.5)
    torch.testing.assert_close(terms.retain, (w_r * sum_sq(pred, (z - gamma * batch.retain) / sigma)).mean())
    torch.testing.assert_close(terms.unlearn, (w_u * sum_sq(pred, (z - gamma * batch.forget) / sigma)).mean())
    assert terms.loss is None


def test_siss_rescales_the_forget_gradient_to_norm_c():
    g_r = [torch.tensor([1.0, 2.0]), torch.tensor([0.5])]
    g_u = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    out = siss_combine(g_r, g_u, 5.0)  # |g_u| = 5, so the forget term is subtracted as is
    torch.testing.assert_close(out[0], torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(out[1], torch.tensor([-3.5]))
    out = siss_combine(g_r, g_u, 10.0)
    diff = torch.cat([(a - b) for a, b in zip(g_r, out)])
    assert diff.norm().item() == pytest.approx(10.0)


def test_every_method_is_registered_with_a_consistent_interface():
    assert set(METHODS) == {"retrack", "vanilla", "neggrad", "erasediff", "siss"}
    sched, batch = linear_schedule(), make_batch(b=2)
    for method in METHODS.values():
        terms = method.objective(Recorder(), batch, sched, torch.Generator().manual_seed(0), Params())
        assert (terms.loss is None) == (method.combine is not None)
        assert terms.total.dim() == 0
