import math

import torch

from arcdiff.model.loss import DiffusionLoss, dual_loss


def test_dual_loss_hand_computed():
    # one sample, one pixel: x0 = 1, eps = 0, eta = pi/2 -> v = -1
    x0, eps = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    eta = torch.tensor([math.pi / 2])
    x0_hat, eps_hat = torch.tensor([[0.5]]), torch.tensor([[1.0]])
    # v_hat = -sin * 0.5 + cos * 1 = -0.5: errors 0.25 + 1 + gamma * 0.25
    assert torch.allclose(dual_loss(x0_hat, eps_hat, x0, eps, eta, gamma=2.0), torch.tensor([1.75]), atol=1e-6)
    assert torch.allclose(dual_loss(x0_hat, eps_hat, x0, eps, eta, gamma=0.0), torch.tensor([1.25]), atol=1e-6)
    # eta = 0: v = eps, v_hat = eps_hat -> velocity error equals the eps error
    eta0 = torch.tensor([0.0])
    assert torch.allclose(dual_loss(x0_hat, eps_hat, x0, eps, eta0, gamma=1.0), torch.tensor([0.25 + 1 + 1]))


def test_perfect_prediction_has_zero_loss():
    class Oracle(torch.nn.Module):
        """Knows x0 and eps (the test constructs x from them with the same generator)."""

        def __init__(self, x0, eps, heads):
            super().__init__()
            self.x0, self.eps, self.heads = x0, eps, heads

        def forward(self, x, eta):
            return torch.cat([self.x0, self.eps], 1) if self.heads == 2 else self.eps

    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(1)
    torch.rand(3, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    for objective, heads in (("dual", 2), ("eps", 1)):
        loss = DiffusionLoss(objective)(Oracle(x0, eps, heads), x0, torch.Generator().manual_seed(1))
        assert loss.shape == (3,) and loss.abs().max() < 1e-10


def test_objectives_select_their_terms():
    def net(x, eta):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x0 = torch.ones(2, 1, 2, 2)
    l_dual = DiffusionLoss("dual", gamma=0.0)(net, x0, torch.Generator().manual_seed(3))
    l_x0 = DiffusionLoss("x0")(lambda x, e: torch.zeros_like(x), x0, torch.Generator().manual_seed(3))
    # zero predictions: x0 term is 1 per pixel; dual adds the eps term (mean eps^2, about 1)
    assert torch.allclose(l_x0, torch.ones(2))
    assert (l_dual > l_x0).all()
