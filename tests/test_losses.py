"""The chunked sparse-KD loss against a plain dense reference, and each rule of docs/losses.md.

The reference below is written the obvious way, in probability space and float64: full-vocabulary
student logits, softmax, coarse-graining onto the cached ids + one tail bucket; the teacher as a dense
full-vocabulary vector (the cached probabilities, the tail mass spread as the tail rule says: evenly
over the uncached tokens for "uniform", all on one uncached token for "bucket"), re-tempered token by
token as p^(T_store/T_train), renormalised and coarse-grained the same way. The implementation under
test works chunk by chunk in log space under checkpointing; value and gradients must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import DistillError
from distill.losses import (
    KDLossConfig,
    LOSS_KINDS,
    TAIL_RULES,
    combine_loss,
    count_valid_tokens,
    distillation_loss_sums,
)

H, V_REAL, V_PAD, K = 12, 45, 50, 6


def make_case(seed=0, n=37, k=K, v_real=V_REAL, v_pad=V_PAD, t_store=1.0, masked_every=4):
    """Student head + hidden states, a teacher top-k cache (contract: 0 at untrained rows)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    head = torch.nn.Linear(H, v_pad, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v_pad, H, generator=g) * 0.7)
    teacher_logits = torch.randn(n, v_real, generator=g) * 2.0
    full_lp = torch.log_softmax(teacher_logits / t_store, dim=-1)
    lp, ids = full_lp.topk(k, dim=-1)
    targets = torch.randint(0, v_real, (n,), generator=g)
    targets[::masked_every] = -100
    ids = ids.clone()
    lp = lp.clone()
    ids[targets == -100] = 0
    lp[targets == -100] = 0.0
    hidden.requires_grad_(True)
    return hidden, head, targets, ids, lp


def dense_teacher(ids, lp, *, a, vocab_size, tail_rule):
    """The teacher as a dense [R, vocab_size] float64 distribution re-tempered by exponent a."""
    p = lp.double().exp()
    p_tail = 1.0 - p.sum(1)
    p_tail = torch.where(p_tail > 1e-6, p_tail, torch.zeros_like(p_tail))
    cached = torch.zeros(p.shape[0], vocab_size, dtype=torch.bool).scatter(1, ids, True)
    n_unc = (~cached).sum(1, keepdim=True)
    if tail_rule == "uniform":
        dense = torch.where(cached, 0.0, p_tail[:, None] / n_unc.clamp_min(1))
    else:  # "bucket": the whole tail on the first uncached token
        first = (~cached).double().argmax(1, keepdim=True)
        dense = torch.zeros(p.shape[0], vocab_size, dtype=torch.float64).scatter(1, first, p_tail[:, None])
        dense = torch.where(cached, 0.0, dense)
    dense = dense.scatter(1, ids, p)
    tempered = torch.where(dense > 0, dense.clamp_min(1e-300) ** a, torch.zeros_like(dense))
    return tempered / tempered.sum(1, keepdim=True), cached


def reference(hidden, weight, targets, ids, lp, *, kind, T=1.0, t_store=1.0, beta=0.5, vocab_size=V_REAL, softcap=None,
              tail_rule="uniform"):
    """Dense full-vocabulary float64 reference over the cached support + tail (plain formulas)."""
    h = hidden.double()
    w = weight.double()
    valid = targets != -100
    h, tg, ids, lp = h[valid], targets[valid], ids[valid], lp[valid].double()
    logits = h @ w.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    cols = torch.arange(logits.shape[1])
    logits = torch.where(cols < vocab_size, logits, torch.tensor(float("-inf"), dtype=logits.dtype))
    q_full = torch.softmax(logits / T, dim=-1)
    ce = -(torch.log_softmax(logits, dim=-1).gather(1, tg[:, None])).sum()

    q = q_full.gather(1, ids)
    in_cache = torch.zeros_like(q_full, dtype=torch.bool).scatter(1, ids, True)
    q_tail = (q_full * (~in_cache)).sum(1)
    p = lp.exp()
    a = t_store / T
    if kind == "forward-kl-renorm":
        pw = p**a
        pr = pw / pw.sum(1, keepdim=True)
        qr = q / q.sum(1, keepdim=True)
        div = (pr * (pr.log() - qr.log())).sum(1)
    else:
        dense, cached_t = dense_teacher(ids, lp, a=a, vocab_size=vocab_size, tail_rule=tail_rule)
        P = torch.cat([dense.gather(1, ids), (dense * (~cached_t)).sum(1, keepdim=True)], 1)
        Q = torch.cat([q, q_tail[:, None]], 1)
        if kind == "forward-kl":
            Qs = torch.where(P > 0, Q, torch.ones_like(Q))  # outcomes the teacher gives no mass: no NaN gradient
            div = torch.where(P > 0, P * (P.log() - Qs.log()), torch.zeros_like(P)).sum(1)
        elif kind == "reverse-kl":
            div = (Q * (Q.log() - P.log())).sum(1)
        else:
            M = beta * P + (1 - beta) * Q
            div = beta * (P * (P.log() - M.log())).sum(1) + (1 - beta) * (Q * (Q.log() - M.log())).sum(1)
    return div.sum() * T * T, ce


def grads(loss, hidden, head):
    gh, gw = torch.autograd.grad(loss, [hidden, head.weight], retain_graph=True)
    return gh, gw


def assert_close(a, b, rtol=2e-4, atol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


TEMPS = [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]  # (T_store, T_train)


@pytest.mark.parametrize("tail_rule", TAIL_RULES)
@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("t_store,t_train", TEMPS)
def test_value_and_gradient_match_dense_reference(kind, t_store, t_train, tail_rule):
    hidden, head, targets, ids, lp = make_case(seed=1, t_store=t_store)
    cfg = KDLossConfig(kind=kind, temperature=t_train, cache_temperature=t_store, vocab_size=V_REAL, chunk_size=8, beta=0.3,
                       tail_rule=tail_rule)
    sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    kd_ref, ce_ref = reference(hidden, head.weight, targets, ids, lp, kind=kind, T=t_train, t_store=t_store, beta=0.3,
                               tail_rule=tail_rule)
    assert sums.n_tokens == int((targets != -100).sum())
    assert_close(sums.kd, kd_ref)
    assert_close(sums.ce, ce_ref)
    assert sums.kd.item() > 0
    for ours, ref in zip(grads(sums.kd, hidden, head), grads(kd_ref, hidden, head)):
        assert_close(ours, ref)
        assert ours.abs().sum() > 0
    for ours, ref in zip(grads(sums.ce, hidden, head), grads(ce_ref, hidden, head)):
        assert_close(ours, ref)


def test_softcapped_head_matches_reference():
    hidden, head, targets, ids, lp = make_case(seed=2)
    cap = 1.5

    def capped(h):
        return torch.tanh(head(h) / cap) * cap

    cfg = KDLossConfig(vocab_size=V_REAL, chunk_size=5)
    sums = distillation_loss_sums(hidden, capped, targets, ids, lp, cfg)
    kd_ref, _ = reference(hidden, head.weight, targets, ids, lp, kind="forward-kl", softcap=cap)
    assert_close(sums.kd, kd_ref)
    for ours, ref in zip(grads(sums.kd, hidden, head), grads(kd_ref, hidden, head)):
        assert_close(ours, ref)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_chunked_equals_unchunked(kind):
    hidden, head, targets, ids, lp = make_case(seed=3, n=41)
    n_valid = count_valid_tokens(targets)
    results = []
    for chunk in (1, 4, 7, n_valid - 1, n_valid, 10_000, None):
        cfg = KDLossConfig(kind=kind, vocab_size=V_REAL, chunk_size=chunk, temperature=1.5, ce_weight=0.5)
        sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
        loss = combine_loss(sums, sums.n_tokens, cfg)
        results.append((loss.detach(), sums.kl_sum, sums.top1_agree, *grads(loss, hidden, head)))
    base = results[-2]
    for other in results:
        for x, y in zip(other, base):
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-6)


def test_padded_columns_and_masked_rows_give_no_nan_and_no_gradient_leak():
    hidden, head, targets, ids, lp = make_case(seed=4)
    with torch.no_grad():
        hidden[targets == -100] = float("nan")  # masked rows never reach the head
        head.weight[V_REAL:] *= 1000.0  # padded columns would dominate if they leaked
    for kind in LOSS_KINDS:
        cfg = KDLossConfig(kind=kind, vocab_size=V_REAL, chunk_size=6, ce_weight=1.0, temperature=2.0)
        sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
        loss = combine_loss(sums, sums.n_tokens, cfg)
        assert torch.isfinite(loss) and torch.isfinite(sums.kl_sum)
        gh, gw = grads(loss, hidden, head)
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
        assert torch.count_nonzero(gh[targets == -100]) == 0
        assert torch.count_nonzero(gw[V_REAL:]) == 0
        assert gw[:V_REAL].abs().sum() > 0
        # padded columns at -inf, never zero: matches the reference that drops them
        kd_ref, ce_ref = reference(
            torch.nan_to_num(hidden.detach()), head.weight, targets, ids, lp, kind=kind, T=2.0
        )
        assert_close(sums.kd, kd_ref)
        assert_close(sums.ce, ce_ref)


def test_padded_columns_are_minus_inf_not_zero():
    """Setting padded logits to 0 (a shipped bug) would change the loss; -inf does not."""
    hidden, head, targets, ids, lp = make_case(seed=5)
    with torch.no_grad():
        head.weight[V_REAL:] = 0.0  # the model's padded rows give logit 0 exactly
    real_only = torch.nn.Linear(H, V_REAL, bias=False)
    with torch.no_grad():
        real_only.weight.copy_(head.weight[:V_REAL])
    padded = distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(vocab_size=V_REAL, ce_weight=1.0))
    exact = distillation_loss_sums(hidden, real_only, targets, ids, lp, KDLossConfig(ce_weight=1.0))
    leaky = distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(vocab_size=None, ce_weight=1.0))
    assert_close(padded.kd, exact.kd)
    assert_close(padded.ce, exact.ce)
    assert abs(float(leaky.ce.detach()) - float(exact.ce.detach())) > 1e-3


def test_no_nan_with_extreme_logits_and_bf16_cache_values():
    hidden, head, targets, ids, lp = make_case(seed=6)
    with torch.no_grad():
        head.weight.mul_(200.0)  # near one-hot student: tails underflow
    lp_bf16 = lp.to(torch.bfloat16).float()  # stored values may sum to slightly more than 1
    for kind in LOSS_KINDS:
        cfg = KDLossConfig(kind=kind, vocab_size=V_REAL, chunk_size=9, ce_weight=1.0)
        sums = distillation_loss_sums(hidden, head, targets, ids, lp_bf16, cfg)
        loss = combine_loss(sums, sums.n_tokens, cfg)
        assert torch.isfinite(loss), kind
        assert float(sums.kd.detach()) >= 0 and float(sums.kl_sum) >= 0
        for g in grads(loss, hidden, head):
            assert torch.isfinite(g).all(), kind


def test_forward_kl_is_zero_when_student_equals_teacher_full_distribution():
    hidden, head, targets, _, _ = make_case(seed=7, v_pad=V_REAL)
    with torch.no_grad():
        full = torch.log_softmax(head(hidden), dim=-1)
    lp, ids = full.topk(V_REAL, dim=-1)  # k = V: the cache holds the whole distribution
    cfg = KDLossConfig(chunk_size=10)
    sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    assert abs(float(sums.kd.detach())) < 1e-5
    assert abs(float(sums.kl_sum)) < 1e-5
    assert int(sums.top1_agree) == sums.n_tokens
    for g in grads(sums.kd, hidden, head):
        assert g.abs().max() < 1e-5
    # and with the top-k + tail of the same distribution (k < V) it is also zero: the tail bucket
    # carries exactly the mass the student puts outside the cache
    lp5, ids5 = full.topk(5, dim=-1)
    sums5 = distillation_loss_sums(hidden, head, targets, ids5, lp5, cfg)
    assert abs(float(sums5.kd.detach())) < 1e-5
    for g in grads(sums5.kd, hidden, head):
        assert g.abs().max() < 1e-5


def test_renormalised_kl_is_blind_at_k1_which_is_why_tail_is_default():
    hidden, head, targets, ids, lp = make_case(seed=8, k=1)
    renorm = distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(kind="forward-kl-renorm", vocab_size=V_REAL))
    assert float(renorm.kd) == 0.0
    assert all(g.abs().max() == 0 for g in grads(renorm.kd, hidden, head))
    tail = distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(vocab_size=V_REAL))
    assert float(tail.kd) > 0.1
    assert grads(tail.kd, hidden, head)[0].abs().max() > 1e-4
    assert float(renorm.kl_sum) > 0.1  # the logged KL stays the true top-k + tail KL


def test_kl_stat_is_true_kl_at_t1_against_stored_teacher_and_top1_counts():
    hidden, head, targets, ids, lp = make_case(seed=9, t_store=1.0)
    cfg = KDLossConfig(kind="jsd", temperature=3.0, cache_temperature=1.0, vocab_size=V_REAL, chunk_size=7)
    sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    kl_ref, _ = reference(hidden, head.weight, targets, ids, lp, kind="forward-kl", T=1.0, t_store=1.0)
    assert_close(sums.kl_sum, kl_ref)
    assert not sums.kl_sum.requires_grad and not sums.top1_agree.requires_grad
    valid = targets != -100
    with torch.no_grad():
        argmax = head(hidden[valid])[:, :V_REAL].argmax(-1)
    assert int(sums.top1_agree) == int((argmax == ids[valid, 0]).sum())


@pytest.mark.parametrize("t_train", [2.0, 1.0, 0.5])
def test_kl_stat_is_taken_at_the_cache_temperature(t_train):
    """A student identical to the teacher reports KL 0 for a cache stored at T_store = 2, whatever T_train
    (student at T=1 against the teacher at T=2 would report a positive KL), and the stat equals the
    dense reference at T_store."""
    hidden, head, targets, _, _ = make_case(seed=15, v_pad=V_REAL)
    with torch.no_grad():
        stored = torch.log_softmax(head(hidden) / 2.0, dim=-1)  # the student's own distribution at T = 2
    lp, ids = stored.topk(K, dim=-1)
    cfg = KDLossConfig(temperature=t_train, cache_temperature=2.0, chunk_size=7, vocab_size=V_REAL)
    sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    assert abs(float(sums.kl_sum)) < 1e-5
    # another student: the stat is the forward KL with the student's logits divided by T_store
    hidden2, head2, targets2, ids2, lp2 = make_case(seed=16, t_store=2.0)
    sums2 = distillation_loss_sums(hidden2, head2, targets2, ids2, lp2,
                                   KDLossConfig(temperature=t_train, cache_temperature=2.0, vocab_size=V_REAL, chunk_size=7))
    kl_ref, _ = reference(hidden2, head2.weight, targets2, ids2, lp2, kind="forward-kl", T=2.0, t_store=2.0)
    assert_close(sums2.kl_sum, kl_ref / 4.0)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_cache_covering_the_vocabulary_gives_a_finite_loss(kind):
    """k = vocabulary: the student has no tail, while the stored values (rounded) leave a teacher tail of
    1e-4. That tail cannot be matched; it is dropped and the teacher renormalised over the k ids, so the
    loss and its gradients stay finite (forward KL was infinite) and equal the dense reference."""
    hidden, head, targets, ids, lp = make_case(seed=17, k=V_REAL)  # logits 50 wide, vocabulary 45
    stored = lp - 1e-4  # every row now sums to exp(-1e-4): a tail of ~1e-4, as fp16 rounding leaves
    stored[targets == -100] = 0.0
    valid = targets != -100
    assert float((-torch.expm1(torch.logsumexp(stored[valid], dim=1))).min()) > 1e-5
    cfg = KDLossConfig(kind=kind, vocab_size=V_REAL, chunk_size=8, temperature=2.0, tail_rule="uniform", ce_weight=0.5)
    sums = distillation_loss_sums(hidden, head, targets, ids, stored, cfg)
    loss = combine_loss(sums, sums.n_tokens, cfg)
    assert torch.isfinite(loss) and torch.isfinite(sums.kl_sum)
    for g in grads(loss, hidden, head):
        assert torch.isfinite(g).all()
    if kind in ("forward-kl", "forward-kl-renorm"):
        kd_ref, _ = reference(hidden, head.weight, targets, ids, stored, kind=kind, T=2.0)
        assert_close(sums.kd, kd_ref)
        for ours, ref in zip(grads(sums.kd, hidden, head), grads(kd_ref, hidden, head)):
            assert_close(ours, ref)


def test_temperature_scaling_multiplies_kd_by_t_squared():
    """With T_store = T_train = T the teacher is unchanged and kd == T^2 * KL(student at T)."""
    hidden, head, targets, ids, lp = make_case(seed=10, t_store=2.0)
    sums = distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(temperature=2.0, cache_temperature=2.0, vocab_size=V_REAL))
    kl_at_t, _ = reference(hidden, head.weight, targets, ids, lp, kind="forward-kl", T=2.0, t_store=2.0)
    assert_close(sums.kd, kl_at_t)
    assert_close(sums.kd / 4.0, kl_at_t / 4.0)
    no_rescale, _ = reference(hidden, head.weight, targets, ids, lp, kind="forward-kl", T=2.0, t_store=1.0)
    assert abs(float(sums.kd) - float(no_rescale)) > 1e-3  # re-tempering matters


def test_ce_is_in_the_backward_pass():
    hidden, head, targets, ids, lp = make_case(seed=11)
    out = []
    for ce_weight in (0.0, 1.0, 3.0):
        cfg = KDLossConfig(vocab_size=V_REAL, ce_weight=ce_weight, kd_weight=0.5)
        sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
        out.append((sums, grads(combine_loss(sums, 100, cfg), hidden, head)))
    (s0, g0), (s1, g1), (s3, g3) = out
    assert (g1[1] - g0[1]).abs().max() > 1e-4
    # linear in the weights: g(3) - g(0) == 3 * (g(1) - g(0)) == 3 * grad(ce) / 100
    gce = grads(s1.ce, hidden, head)
    for a, b, c, d in zip(g0, g1, g3, gce):
        assert_close(c - a, 3 * (b - a))
        assert_close(b - a, d / 100)


def test_gradient_accumulation_equals_one_batch():
    n_rows = [9, 23, 14]
    parts = [make_case(seed=20 + i, n=n, masked_every=2 + i) for i, n in enumerate(n_rows)]
    head = parts[0][1]
    cfg = KDLossConfig(vocab_size=V_REAL, ce_weight=0.7, kd_weight=1.3, temperature=1.5, chunk_size=5)
    counts = [count_valid_tokens(p[2]) for p in parts]
    assert len(set(counts)) == 3  # different valid-token counts per micro-batch
    n_step = sum(counts)

    head.zero_grad()
    hiddens = [p[0] for p in parts]
    for (hidden, _, targets, ids, lp) in parts:
        combine_loss(distillation_loss_sums(hidden, head, targets, ids, lp, cfg), n_step, cfg).backward()
    accumulated = head.weight.grad.clone()
    acc_hidden = [h.grad.clone() for h in hiddens]

    head.zero_grad()
    big_hidden = torch.cat([h.detach() for h in hiddens]).requires_grad_(True)
    cat = [torch.cat([p[i] for p in parts]) for i in (2, 3, 4)]
    combine_loss(distillation_loss_sums(big_hidden, head, *cat, cfg), n_step, cfg).backward()
    assert_close(accumulated, head.weight.grad, rtol=1e-5, atol=1e-7)
    assert_close(torch.cat(acc_hidden), big_hidden.grad, rtol=1e-5, atol=1e-7)

    # the shipped bug: dividing each micro-batch by its own count gives a different gradient
    head.zero_grad()
    for (hidden, _, targets, ids, lp), c in zip(parts, counts):
        combine_loss(distillation_loss_sums(hidden.detach(), head, targets, ids, lp, cfg), c, cfg).backward()
    assert (head.weight.grad / 3 - accumulated).abs().max() > 1e-5


def test_accepts_batch_shaped_inputs_and_all_masked_batch():
    hidden, head, targets, ids, lp = make_case(seed=12, n=24)
    cfg = KDLossConfig(vocab_size=V_REAL, ce_weight=1.0)
    flat = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    shaped = distillation_loss_sums(hidden.view(4, 6, H), head, targets.view(4, 6), ids.view(4, 6, K), lp.view(4, 6, K), cfg)
    assert_close(flat.kd, shaped.kd)
    assert_close(flat.ce, shaped.ce)
    none = distillation_loss_sums(hidden, head, torch.full_like(targets, -100), ids, lp, cfg)
    loss = combine_loss(none, 0, cfg)
    assert none.n_tokens == 0 and float(loss) == 0.0
    loss.backward()  # still attached to the graph, gradient zero
    assert torch.count_nonzero(hidden.grad) == 0


def test_bad_inputs_raise_one_line_errors():
    hidden, head, targets, ids, lp = make_case(seed=13)
    bad = ids.clone()
    bad[targets != -100] = V_REAL + 1  # a token the tokenizer does not have
    with pytest.raises(DistillError, match="outside the student vocabulary"):
        distillation_loss_sums(hidden, head, targets, bad, lp, KDLossConfig(vocab_size=V_REAL))
    with pytest.raises(DistillError, match="logits width"):
        distillation_loss_sums(hidden, head, targets, ids, lp, KDLossConfig(vocab_size=V_PAD + 10))
    with pytest.raises(DistillError, match="unknown loss kind"):
        KDLossConfig(kind="kl")
    with pytest.raises(DistillError, match="beta"):
        KDLossConfig(kind="jsd", beta=1.0)
    with pytest.raises(DistillError, match="temperature"):
        KDLossConfig(temperature=0.0)
    with pytest.raises(DistillError, match="both 0"):
        KDLossConfig(kd_weight=0.0, ce_weight=0.0)
    assert math.isclose(KDLossConfig().rows_per_chunk(262_144), 256)
    assert KDLossConfig().rows_per_chunk(49_152) == 1024


def _saved_wide_tensors(n_rows, chunk):
    hidden, head, targets, ids, lp = make_case(seed=14, n=n_rows, masked_every=10_000)
    cfg = KDLossConfig(vocab_size=V_REAL, chunk_size=chunk, ce_weight=1.0)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = distillation_loss_sums(hidden, head, targets, ids, lp, cfg)
    combine_loss(sums, sums.n_tokens, cfg).backward()
    assert torch.isfinite(hidden.grad).all()
    return [s for s in saved if len(s) == 2 and s[1] == V_PAD and s != (H, V_PAD)]  # not the weight


def test_only_one_chunk_of_logits_is_alive_between_forward_and_backward():
    """Saved-for-backward [rows, V] tensors never exceed one chunk, whatever the number of rows."""
    one_chunk = _saved_wide_tensors(8, 8)
    many_chunks = _saved_wide_tensors(64, 8)
    assert one_chunk and all(s[0] <= 8 for s in one_chunk)
    assert sorted(many_chunks) == sorted(one_chunk)  # 8 chunks keep what 1 chunk keeps
