"""Every loss against a direct, slow computation of its formula."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from glimr.models.output import RetrievalOutput
from glimr.train.losses import ArcFace, ContrastiveLoss, Criterion, SoftmaxCE, contrastive_loss


def _arcface_direct(x, w, labels, m, s, easy=False):
    """UGALR eq. (6) written out per sample with acos/cos, in float64."""
    x, w = x.double(), w.double()
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i] / x[i].norm()
        cos = [float(xi @ (w[j] / w[j].norm())) for j in range(w.shape[0])]
        y = int(labels[i])
        theta = math.acos(max(-1.0, min(1.0, cos[y])))
        if easy:
            tgt = math.cos(theta + m) if cos[y] > 0 else cos[y]
        elif theta + m <= math.pi:
            tgt = math.cos(theta + m)
        else:  # the monotonic continuation (insightface)
            tgt = cos[y] - math.sin(math.pi - m) * m
        num = math.exp(s * tgt)
        den = num + sum(math.exp(s * cos[j]) for j in range(len(cos)) if j != y)
        total += -math.log(num / den)
    return total / x.shape[0]


@pytest.mark.parametrize("m,s", [(0.3, 30.0), (0.15, 30.0), (0.5, 64.0)])
def test_arcface_matches_direct_formula(m, s):
    torch.manual_seed(0)
    af = ArcFace(16, 7, margin=m, scale=s)
    x = torch.randn(12, 16)
    y = torch.randint(0, 7, (12,))
    assert af(x, y).item() == pytest.approx(_arcface_direct(x, af.weight.detach(), y, m, s), rel=1e-5, abs=1e-5)


def test_arcface_large_angle_branch_and_easy_margin():
    torch.manual_seed(1)
    af = ArcFace(8, 3, margin=0.5, scale=10.0)
    w = af.weight.detach()
    y = torch.tensor([0, 1])
    x = -w[y] + 0.05 * torch.randn(2, 8)             # theta_y near pi: theta + m > pi
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    assert float(cos[0, 0]) < math.cos(math.pi - 0.5)
    assert af(x, y).item() == pytest.approx(_arcface_direct(x, w, y, 0.5, 10.0), rel=1e-5)
    easy = ArcFace(8, 3, margin=0.5, scale=10.0, easy_margin=True)
    easy.weight.data.copy_(w)
    assert easy(x, y).item() == pytest.approx(_arcface_direct(x, w, y, 0.5, 10.0, easy=True), rel=1e-5)


def test_arcface_margin_zero_is_scaled_softmax_of_cosines():
    torch.manual_seed(2)
    af = ArcFace(8, 5, margin=0.0, scale=16.0)
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    ref = F.cross_entropy(16.0 * F.normalize(x, dim=1) @ F.normalize(af.weight.detach(), dim=1).T, y)
    assert af(x, y).item() == pytest.approx(float(ref), rel=1e-6)


def test_arcface_gradient_is_finite_at_exact_match():
    af = ArcFace(4, 2, margin=0.3)
    x = af.weight.detach()[:1].clone().requires_grad_(True)   # cos theta_y = 1 exactly
    af(x, torch.tensor([0])).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(af.weight.grad).all()


def test_softmax_ce_matches_direct():
    torch.manual_seed(3)
    ce = SoftmaxCE(6, 4)
    x, y = torch.randn(5, 6).double(), torch.tensor([0, 3, 1, 1, 2])
    W, b = ce.fc.weight.detach().double(), ce.fc.bias.detach().double()
    direct = 0.0
    for i in range(5):  # UGALR eq. (5): -log(e^{W_y x + b_y} / sum_j e^{W_j x + b_j})
        z = [float(W[j] @ x[i] + b[j]) for j in range(4)]
        direct += -(z[int(y[i])] - math.log(sum(math.exp(v) for v in z)))
    assert ce(x.float(), y).item() == pytest.approx(direct / 5, rel=1e-5)


def test_contrastive_matches_direct_pairs():
    torch.manual_seed(4)
    x = torch.randn(7, 5)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    tau = 0.7
    xn = F.normalize(x.double(), dim=1)
    terms = []
    for i in range(7):
        for j in range(i + 1, 7):
            d = float((xn[i] - xn[j]).norm())
            terms.append(0.5 * d * d if y[i] == y[j] else 0.5 * max(0.0, tau - d) ** 2)
    assert float(contrastive_loss(x, y, tau)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(ContrastiveLoss(tau)(x, y)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_criterion_adds_weighted_intermediate_ce():
    torch.manual_seed(5)
    crit = Criterion(dim=8, num_classes=4, margin=0.15, scale=30.0, inter_dim=6, inter_weight=0.6)
    desc, emb = F.normalize(torch.randn(5, 8), dim=1), torch.randn(5, 6)
    y = torch.tensor([0, 1, 2, 3, 0])
    total, parts = crit(RetrievalOutput(descriptor=desc, aux={"inter_embedding": emb}), y)
    lg, la = crit.main(desc, y), crit.inter(emb, y)
    assert total.item() == pytest.approx((lg + 0.6 * la).item(), rel=1e-6)       # UGALR eq. (7)
    assert parts["arcface"] == pytest.approx(lg.item()) and parts["inter_ce"] == pytest.approx(la.item())
    # no aux embedding: ArcFace alone
    total2, parts2 = crit(RetrievalOutput(descriptor=desc), y)
    assert total2.item() == pytest.approx(lg.item()) and "inter_ce" not in parts2


def test_criterion_errors():
    with pytest.raises(ValueError, match="arcface"):
        Criterion(4, 3, loss="triplet")
    crit = Criterion(4, 3)
    with pytest.raises(RuntimeError, match="inter_dim"):
        crit(RetrievalOutput(descriptor=torch.randn(2, 4), aux={"inter_embedding": torch.randn(2, 3)}),
             torch.tensor([0, 1]))


def test_box_coverage_matches_direct_cell_overlaps():
    from glimr.train.losses import box_coverage

    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    cov = box_coverage(boxes, 3, 4)
    for b in range(2):
        x0, y0, x1, y1 = boxes[b].tolist()
        for r in range(3):
            for c in range(4):
                ox = max(0.0, min(x1, (c + 1) / 4) - max(x0, c / 4)) * 4
                oy = max(0.0, min(y1, (r + 1) / 3) - max(y0, r / 3)) * 3
                assert float(cov[b, r, c]) == pytest.approx(ox * oy, abs=1e-6)
    assert torch.allclose(cov[1], torch.ones(3, 4))


def test_localization_loss_is_bce_of_minmax_map_on_composites_only():
    from glimr.train.losses import box_coverage, localization_loss

    torch.manual_seed(6)
    att = torch.rand(3, 4, 5) * 3
    boxes = torch.tensor([[0.2, 0.1, 0.7, 0.6], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 1.0]])
    got = float(localization_loss(att, boxes))
    terms = []
    for b in (0, 2):                                   # the clean view (whole-image box) is left out
        a = (att[b] - att[b].min()) / (att[b].max() - att[b].min())
        a = a.clamp(1e-4, 1 - 1e-4).double()
        cov = box_coverage(boxes[b:b + 1], 4, 5)[0].double()
        terms.append(-(cov * a.log() + (1 - cov) * (1 - a).log()).mean())
    assert got == pytest.approx(float(sum(terms) / 2), rel=1e-5)
    assert float(localization_loss(att[1:2], boxes[1:2])) == 0.0
    crit = Criterion(8, 3, loc_weight=2.0, loc_map="A")
    desc = F.normalize(torch.randn(3, 8), dim=1)
    total, parts = crit(RetrievalOutput(descriptor=desc, attention={"A": att}), torch.tensor([0, 1, 2]), boxes)
    assert total.item() == pytest.approx(parts["arcface"] + 2.0 * got, rel=1e-5)
    with pytest.raises(RuntimeError, match="loc_map"):
        crit(RetrievalOutput(descriptor=desc), torch.tensor([0, 1, 2]), boxes)
