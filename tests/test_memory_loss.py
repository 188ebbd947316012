"""Memory losses (model.py): pair selection, L1 and DINO values, gradients and per-step statistics."""

import math

import pytest
import torch

from model import (DINOHead, DINOMemoryLoss, L1MemoryLoss, MemoryLoss, RunningStandardizer, dino_cross_entropy,
                   memory_pair_mask, memory_pairs, memory_positions)

BOS, PAD = 2, 0


def no_reduce(tensor):
    return tensor


def window(tokens):
    return torch.tensor([tokens])


# -----------------------------------------------------------------------------
# pairs


def test_positions_exclude_bos_and_padding():
    idx = torch.tensor([[BOS, 5, 6, BOS, 7, PAD, PAD],
                        [BOS, 9, 9, 9, 9, 9, 9]])
    usable = memory_positions(idx, BOS, PAD)
    assert usable.tolist() == [[False, True, True, False, True, False, False],
                               [False, True, True, True, True, True, True]]


def test_position_zero_excluded_even_without_bos():
    usable = memory_positions(window([7, 8, 9]), BOS, PAD)
    assert usable.tolist() == [[False, True, True]]


def test_pairs_skip_bos_and_padding():
    # offset 2: pairs (t, t-2) for t = 2..6; t=2 pairs with BOS at 0, t=5 and t=6 are padding
    idx = window([BOS, 11, 12, 13, 14, PAD, PAD])
    usable = memory_positions(idx, BOS, PAD)
    mask = memory_pair_mask(usable, 2)
    pairs = [(j + 2, j) for j in range(mask.shape[1]) if mask[0, j]]
    assert pairs == [(3, 1), (4, 2)]


def test_pairs_select_rows():
    hidden = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    usable = memory_positions(window([BOS, 1 + 10, 12, 13, 14, 15]), BOS, PAD)
    student, teacher, mask = memory_pairs(hidden, usable, 3)
    assert mask.sum().item() == 2  # (4, 1) and (5, 2); (3, 0) touches BOS
    assert torch.equal(student, hidden[0, [4, 5]])
    assert torch.equal(teacher, hidden[0, [1, 2]])


def test_bos_row_does_not_change_loss():
    torch.manual_seed(0)
    idx = window([BOS] + list(range(10, 19)))
    usable = memory_positions(idx, BOS, PAD)
    hidden = torch.randn(1, 10, 4)
    loss = L1MemoryLoss()
    before = loss(*memory_pairs(hidden, usable, 3)[:2], None)['loss']
    hidden[0, 0] = 1e5  # Gemma 3's BOS row is an order of magnitude larger than the rest
    after = loss(*memory_pairs(hidden, usable, 3)[:2], None)['loss']
    assert torch.equal(before, after)

# -----------------------------------------------------------------------------
# L1


def standardizer(mean, var):
    norm = RunningStandardizer(len(mean), eps=0.0)
    norm.mean.copy_(torch.tensor(mean))
    norm.var.copy_(torch.tensor(var))
    norm.initialized.fill_(True)
    return norm


def test_l1_hand_computed():
    # rows: BOS, a, b, c with offset 2 -> one pair (3, 1): student c, teacher a
    hidden = torch.tensor([[[100.0, 100.0], [1.0, 10.0], [0.0, 0.0], [3.0, 4.0]]])
    usable = memory_positions(window([BOS, 5, 6, 7]), BOS, PAD)
    norm = standardizer([1.0, 2.0], [4.0, 16.0])  # std 2 and 4
    out = L1MemoryLoss()(*memory_pairs(hidden, usable, 2)[:2], norm)
    # n(c) = ((3-1)/2, (4-2)/4) = (1, 0.5); n(a) = (0, 2); |diff| = (1, 1.5), mean 1.25
    assert out['loss'].item() == pytest.approx(1.25)
    # raw |c - a| = (2, 6), mean 4
    assert out['raw'].item() == pytest.approx(4.0)


def test_l1_sums_over_pairs():
    hidden = torch.tensor([[[0.0], [1.0], [2.0], [4.0], [8.0]]])
    usable = memory_positions(window([BOS, 5, 6, 7, 8]), BOS, PAD)
    out = L1MemoryLoss()(*memory_pairs(hidden, usable, 1)[:2], None)
    # pairs (2,1), (3,2), (4,3): |2-1| + |4-2| + |8-4| = 7
    assert out['loss'].item() == pytest.approx(7.0)


@pytest.mark.parametrize('kind', ['l1', 'dino'])
def test_no_gradient_to_earlier_state(kind):
    torch.manual_seed(0)
    offset, T = 3, 10
    memory = MemoryLoss(kind, [1], hidden_size=8, offset=offset,
                        dino={'hidden_dim': 16, 'bottleneck_dim': 4, 'num_prototypes': 8})
    memory.norms['1'].initialized.fill_(True)
    hidden = torch.randn(1, T, 8, requires_grad=True)
    usable = memory_positions(window([BOS] + list(range(10, 10 + T - 1))), BOS, PAD)
    out = memory({1: hidden}, usable)
    out[1]['loss'].backward()
    grad_norms = hidden.grad[0].norm(dim=-1)
    # positions 1..offset only ever serve as H_{t-k}: no gradient may reach them
    assert torch.count_nonzero(grad_norms[:offset + 1]) == 0
    # every student position t = offset+1 .. T-1 gets one
    assert torch.all(grad_norms[offset + 1:] > 0)


def test_running_stats_first_step_exact():
    torch.manual_seed(0)
    h = torch.randn(50, 3, dtype=torch.float64) * torch.tensor([1e4, 1.0, 0.01]) + torch.tensor([1e5, -3.0, 0.5])
    norm = RunningStandardizer(3, momentum=0.9)
    norm.accumulate(h[:20])
    norm.accumulate(h[20:])
    norm.end_step(no_reduce)
    assert torch.allclose(norm.mean.double(), h.mean(0), rtol=1e-6)
    assert torch.allclose(norm.var.double(), h.var(0, unbiased=False), rtol=1e-5)
    assert bool(norm.initialized)


def test_running_stats_ema_after_first():
    torch.manual_seed(1)
    a, b = torch.randn(40, 2) * 3 + 1, torch.randn(40, 2) * 0.5 - 2
    norm = RunningStandardizer(2, momentum=0.75)
    norm.accumulate(a)
    norm.end_step(no_reduce)
    norm.accumulate(b)
    norm.end_step(no_reduce)
    expected_mean = 0.75 * a.mean(0) + 0.25 * b.mean(0)
    expected_var = 0.75 * a.var(0, unbiased=False) + 0.25 * b.var(0, unbiased=False)
    assert torch.allclose(norm.mean, expected_mean, atol=1e-5)
    assert torch.allclose(norm.var, expected_var, atol=1e-5)


def test_standardized_channels_weigh_equally():
    # one channel at 1e5 scale, one at 1: after standardization both contribute alike
    torch.manual_seed(0)
    h = torch.randn(200, 2) * torch.tensor([1e5, 1.0])
    norm = RunningStandardizer(2)
    norm.accumulate(h)
    norm.end_step(no_reduce)
    z = norm(h)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(2), atol=1e-3)

# -----------------------------------------------------------------------------
# DINO


def test_dino_cross_entropy_hand_computed():
    student = torch.tensor([[0.2, -0.1, 0.0]])
    teacher = torch.tensor([[0.5, 0.1, -0.3]])
    center = torch.tensor([0.1, 0.0, -0.1])
    ts, tt = 0.1, 0.04
    s_logits = [v / ts for v in (0.2, -0.1, 0.0)]
    t_logits = [(t - c) / tt for t, c in zip((0.5, 0.1, -0.3), (0.1, 0.0, -0.1))]
    s_lse = math.log(sum(math.exp(v) for v in s_logits))
    t_lse = math.log(sum(math.exp(v) for v in t_logits))
    p_t = [math.exp(v - t_lse) for v in t_logits]
    log_p_s = [v - s_lse for v in s_logits]
    expected_ce = -sum(p * q for p, q in zip(p_t, log_p_s))
    expected_ht = -sum(p * (v - t_lse) for p, v in zip(p_t, t_logits))
    expected_hs = -sum(math.exp(q) * q for q in log_p_s)

    ce, ht, hs = dino_cross_entropy(student, teacher, center, ts, tt)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-6)
    assert ht.item() == pytest.approx(expected_ht, abs=1e-6)  # a small entropy: float32 rounding is absolute
    assert hs.item() == pytest.approx(expected_hs, rel=1e-6)


def test_dino_uniform_is_log_k():
    K = 16
    ce, ht, hs = dino_cross_entropy(torch.zeros(3, K), torch.zeros(3, K), torch.zeros(K), 0.1, 0.04)
    assert torch.allclose(ce, torch.full((3,), math.log(K)))
    assert torch.allclose(ht, torch.full((3,), math.log(K)))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_dino_stable_at_low_temperature(dtype):
    # cosine scores at the extremes, the teacher at 0.04: logits of +-50 and probabilities that underflow
    student = torch.tensor([[1.0, -1.0, 0.0, 1.0]], dtype=dtype, requires_grad=True)
    teacher = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    center = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    ce, ht, hs = dino_cross_entropy(student, teacher, center, 0.1, 0.04)
    ce.sum().backward()
    assert torch.isfinite(ce).all()
    assert torch.isfinite(ht).all()
    assert ht.item() >= 0
    assert torch.isfinite(hs).all()
    assert torch.isfinite(student.grad).all()


def test_dino_head_scores_are_cosines():
    torch.manual_seed(0)
    head = DINOHead(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5)
    scores = head(torch.randn(7, 8) * 1e3)
    assert scores.shape == (7, 5)
    assert scores.abs().max() <= 1.0 + 1e-6
    head.prototypes.data[0] = head.mlp(torch.ones(1, 8) * 3).detach()[0] * 17.0  # a prototype's scale is irrelevant
    top = head(torch.ones(1, 8) * 3)[0, 0]
    assert top.item() == pytest.approx(1.0, abs=1e-5)


def test_dino_teacher_has_own_storage():
    loss = DINOMemoryLoss(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5, teacher='ema')
    student_ptrs = {p.data_ptr() for p in loss.head.parameters()}
    teacher_params = list(loss.teacher_head.parameters())
    assert all(p.data_ptr() not in student_ptrs for p in teacher_params)
    assert not any(p.requires_grad for p in teacher_params)
    for t, s in zip(teacher_params, loss.head.parameters()):
        assert torch.equal(t, s)  # an exact copy at start


def test_dino_ema_update_formula():
    torch.manual_seed(0)
    loss = DINOMemoryLoss(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5, teacher_momentum=0.9)
    before = [p.clone() for p in loss.teacher_head.parameters()]
    with torch.no_grad():
        for p in loss.head.parameters():
            p.add_(torch.randn_like(p))
    student_copy = [p.clone() for p in loss.head.parameters()]
    loss.update_teacher()
    for t, t0, s in zip(loss.teacher_head.parameters(), before, student_copy):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7)
    for s, s0 in zip(loss.head.parameters(), student_copy):
        assert torch.equal(s, s0)


def test_dino_shared_teacher_has_no_copy():
    loss = DINOMemoryLoss(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5, teacher='shared')
    assert loss.teacher_head is None
    names = [n for n, _ in loss.named_parameters()]
    assert all(n.startswith('head.') for n in names)


def test_dino_center_update():
    torch.manual_seed(0)
    loss = DINOMemoryLoss(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5, center_momentum=0.8)
    loss.center.fill_(0.5)
    student, teacher = torch.randn(6, 8), torch.randn(6, 8)
    loss(student, teacher, None)
    with torch.no_grad():
        scores = loss.teacher_head(teacher)
    metrics = loss.end_step(no_reduce)
    assert torch.allclose(loss.center, 0.8 * 0.5 + 0.2 * scores.mean(0), atol=1e-6)
    assert 1 <= metrics['prototypes_used'] <= 5
    assert 0 <= metrics['teacher_entropy'] <= math.log(5) + 1e-6
    assert metrics['kl'] >= -1e-6


def test_dino_eval_mode_keeps_statistics():
    loss = DINOMemoryLoss(8, hidden_dim=16, bottleneck_dim=4, num_prototypes=5).eval()
    loss(torch.randn(4, 8), torch.randn(4, 8), None)
    assert torch.count_nonzero(loss.step_sums) == 0

# -----------------------------------------------------------------------------
# gradient accumulation: one micro-batch of 4 windows against 4 micro-batches of 1


def accumulation_run(kind, micro_batches, hidden, usable, seed=0):
    torch.manual_seed(seed)
    memory = MemoryLoss(kind, [3, 5], hidden_size=hidden[3].shape[-1], offset=4, weights=[1.0, 0.5],
                        dino={'hidden_dim': 32, 'bottleneck_dim': 8, 'num_prototypes': 16})
    # calibrate the standardizers on the whole batch, as train.py does before step 0
    memory.calibrate({3: hidden[3], 5: hidden[5]}, usable)
    memory.end_calibration(no_reduce)
    n_pairs = memory_pair_mask(usable, 4).sum()
    h = {layer: hidden[layer].clone().requires_grad_(True) for layer in (3, 5)}
    B = usable.shape[0] // micro_batches
    for m in range(micro_batches):
        rows = slice(m * B, (m + 1) * B)
        out = memory({layer: h[layer][rows] for layer in (3, 5)}, usable[rows])
        loss = sum(w * out[layer]['loss'] for w, layer in zip(memory.weights, (3, 5))) / n_pairs
        loss.backward()
    grads = {layer: h[layer].grad for layer in (3, 5)}
    head_grads = [p.grad.clone() for p in memory.parameters() if p.grad is not None]
    with torch.no_grad():
        for p in memory.parameters():
            if p.requires_grad:
                p.sub_(0.1 * p.grad)  # an SGD step, so the EMA teacher has something to follow
    metrics = memory.end_step(no_reduce)
    return memory, grads, head_grads, metrics


@pytest.mark.parametrize('kind', ['l1', 'dino'])
def test_accumulation_matches_one_batch(kind):
    torch.manual_seed(42)
    T, C = 24, 16
    hidden = {3: torch.randn(4, T, C) * torch.linspace(0.1, 100, C), 5: torch.randn(4, T, C)}
    idx = torch.randint(10, 100, (4, T))
    idx[:, 0] = BOS
    idx[2, 18:] = PAD  # a short document
    usable = memory_positions(idx, BOS, PAD)
    whole, grads_whole, head_whole, metrics_whole = accumulation_run(kind, 1, hidden, usable)
    split, grads_split, head_split, metrics_split = accumulation_run(kind, 4, hidden, usable)
    for layer in (3, 5):
        assert torch.allclose(grads_whole[layer], grads_split[layer], atol=1e-6)
    assert len(head_whole) == len(head_split)
    for a, b in zip(head_whole, head_split):
        assert torch.allclose(a, b, atol=1e-6)
    whole_state, split_state = whole.state_dict(), split.state_dict()
    assert whole_state.keys() == split_state.keys()
    for key in whole_state:  # running mean/var, DINO center and EMA teacher weights
        assert torch.allclose(whole_state[key].float(), split_state[key].float(), atol=1e-6), key
    for layer in (3, 5):
        for name, value in metrics_whole[layer].items():
            assert metrics_split[layer][name] == pytest.approx(value, abs=1e-6), name


def test_memory_loss_settings_round_trip():
    memory = MemoryLoss('dino', [6, 12], hidden_size=8, offset=4, weights=[1.0, 0.5], norm=None,
                        dino={'hidden_dim': 16, 'bottleneck_dim': 4, 'num_prototypes': 8, 'teacher': 'shared'})
    copy = MemoryLoss.from_settings(memory.settings())
    assert copy.settings() == memory.settings()
    assert copy.state_dict().keys() == memory.state_dict().keys()
    assert not copy.norms


@pytest.mark.parametrize('kwargs, message', [
    ({'kind': 'cosine'}, 'memory_loss'),
    ({'layers': [6, 6]}, 'distinct'),
    ({'weights': [1.0, 2.0]}, 'one weight per layer'),
    ({'norm': 'batch'}, 'memory_norm'),
])
def test_memory_loss_rejects_bad_settings(kwargs, message):
    args = {'kind': 'l1', 'layers': 6, 'hidden_size': 8, 'offset': 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        MemoryLoss(**args)
