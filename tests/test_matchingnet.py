"""Matching Networks (methods spec §3, tests of §11.3 item 2), all in float64."""
import torch
from torch.autograd import gradcheck, gradgradcheck

from mamlpp.methods.matchingnet import (cosine_log_probs, fce_query, fce_support, init_fce, lstm_cell,
                                        matching_log_probs)

F64 = torch.float64


def episode(tasks=3, ways=5, shots=2, queries=3, d=6, seed=0):
    """Random embeddings of B episodes; support labels shuffled per task (sampler order)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.stack([torch.arange(ways).repeat(shots)[torch.randperm(ways * shots, generator=g)]
                      for _ in range(tasks)])
    support = torch.randn(tasks, ways * shots, d, generator=g, dtype=F64)
    query = torch.randn(tasks, ways * queries, d, generator=g, dtype=F64)
    return support, ys, query


def fce_params(d, seed=1):
    return init_fce(d, torch.Generator().manual_seed(seed), F64, "cpu")


def test_lstm_cell_equals_torch_lstm_cell():
    d, g = 5, torch.Generator().manual_seed(0)
    p = fce_params(d)
    for cell, width in (("support_fw", d), ("query", 2 * d)):
        ref = torch.nn.LSTMCell(width, d).to(F64)
        ref.load_state_dict({k.split(".")[-1]: v for k, v in p.items() if k.startswith(f"fce.{cell}.")})
        x = torch.randn(2, 3, width, generator=g, dtype=F64)  # extra leading axes: [B, n, in]
        h, c = torch.randn(2, 2, 3, d, generator=g, dtype=F64)
        ours = lstm_cell(x, h, c, p, f"fce.{cell}")
        theirs = ref(x.reshape(6, width), (h.reshape(6, d), c.reshape(6, d)))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.reshape(6, d), b, rtol=0, atol=1e-14)


def test_fce_support_equals_torch_bidirectional_lstm():
    support, _, _ = episode(d=4)
    p = fce_params(4)
    ref = torch.nn.LSTM(4, 4, batch_first=True, bidirectional=True).to(F64)
    ref.load_state_dict({f"{name}_l0{suffix}": p[f"fce.{cell}.{name}"]
                         for cell, suffix in (("support_fw", ""), ("support_bw", "_reverse"))
                         for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    out = ref(support)[0]  # [B, ns, 2d] = [→h, ←h], zero initial states
    torch.testing.assert_close(fce_support(p, support), out[..., :4] + out[..., 4:] + support, rtol=0, atol=1e-14)


def test_fce_query_equals_the_recurrence_with_torch_lstm_cell():
    support, _, query = episode(tasks=2, d=4)
    p = fce_params(4)
    cell = torch.nn.LSTMCell(8, 4).to(F64)
    cell.load_state_dict({k.split(".")[-1]: v for k, v in p.items() if k.startswith("fce.query.")})
    out = fce_query(p, query, support, 3)
    for t in range(2):
        for j in range(query.shape[1]):  # one query of one task at a time
            f, h, c = query[t, j:j + 1], torch.zeros(1, 4, dtype=F64), torch.zeros(1, 4, dtype=F64)
            for _ in range(3):
                weights = torch.softmax((support[t] * h).sum(-1), 0)  # dot product h^T g_i over items i
                r = (weights[:, None] * support[t]).sum(0, keepdim=True)
                h, c = cell(torch.cat([f, r], -1), (h, c))
                h = h + f
            torch.testing.assert_close(out[t, j:j + 1], h, rtol=0, atol=1e-13)


def test_init_fce_is_deterministic():
    a, b = fce_params(4, seed=3), fce_params(4, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["fce.query.weight_ih"].shape == (16, 8) and a["fce.support_bw.weight_hh"].shape == (16, 4)
    assert all(v.abs().max() <= 0.5 for v in a.values())  # 1 / sqrt(4)


def test_cosine_log_probs_follow_the_formula():
    support, ys, query = episode(d=4)
    a = torch.softmax(torch.nn.functional.cosine_similarity(query[:, :, None], support[:, None], dim=-1), -1)
    probs = torch.stack([(a * (ys == n)[:, None]).sum(-1) for n in range(5)], -1)
    torch.testing.assert_close(cosine_log_probs(support, ys, query, 5), probs.log(), rtol=0, atol=1e-12)
    # Cosine ignores each embedding's length: rescaling items leaves the scores unchanged.
    scale = torch.rand(*support.shape[:2], 1, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.1
    torch.testing.assert_close(cosine_log_probs(support * scale, ys, 3 * query, 5),
                               cosine_log_probs(support, ys, query, 5), rtol=0, atol=1e-12)


def test_support_permutation_leaves_predictions_unchanged():
    support, ys, query = episode()
    perm = torch.randperm(ys.shape[1], generator=torch.Generator().manual_seed(5))
    a = matching_log_probs({}, support, ys, query, 5, fce=False, fce_steps=3)
    b = matching_log_probs({}, support[:, perm], ys[:, perm], query, 5, fce=False, fce_steps=3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_query_equal_to_support_item_gets_its_class():
    for ways, shots in ((5, 1), (5, 3), (20, 2)):
        n, d = ways * shots, 64
        basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(ways + shots),
                                            dtype=F64))[0]
        support = 3.0 * basis[:n].unsqueeze(0)  # orthogonal rows: cosine 1 with itself, 0 otherwise
        ys = torch.arange(ways).repeat(shots).unsqueeze(0)
        log_p = cosine_log_probs(support, ys, support, ways)
        assert torch.equal(log_p.argmax(-1), ys)


def test_probabilities_sum_to_one_and_tasks_are_independent():
    support, ys, query = episode(tasks=3, d=4)
    p = fce_params(4)
    for fce in (False, True):
        together = matching_log_probs(p, support, ys, query, 5, fce=fce, fce_steps=3)
        torch.testing.assert_close(together.exp().sum(-1), torch.ones(3, 15, dtype=F64), rtol=0, atol=1e-12)
        for t in range(3):
            alone = matching_log_probs(p, support[t:t + 1], ys[t:t + 1], query[t:t + 1], 5, fce=fce, fce_steps=3)
            torch.testing.assert_close(together[t:t + 1], alone, rtol=0, atol=1e-12)


def test_fce_with_zero_weights_is_the_plain_classifier():
    # Zero weights: gates i = f = o = 1/2 and candidate tanh(0) = 0, so c stays exactly 0 and the
    # cell outputs ĥ = o * tanh(0) = 0: g = 0 + 0 + g' and every attLSTM step gives h_k = 0 + f'.
    support, ys, query = episode(d=4)
    zero = {k: torch.zeros_like(v) for k, v in fce_params(4).items()}
    assert torch.equal(fce_support(zero, support), support)
    assert torch.equal(fce_query(zero, query, support, 3), query)
    assert torch.equal(matching_log_probs(zero, support, ys, query, 5, fce=True, fce_steps=3),
                       matching_log_probs(zero, support, ys, query, 5, fce=False, fce_steps=3))


def test_attlstm_is_order_invariant_and_bilstm_is_not():
    support, _, query = episode(d=4)
    p = fce_params(4)
    perm = torch.randperm(support.shape[1], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fce_query(p, query, support[:, perm], 3), fce_query(p, query, support, 3),
                               rtol=0, atol=1e-12)
    moved = fce_support(p, support[:, perm])  # item perm[j] now at position j
    assert (moved - fce_support(p, support)[:, perm]).abs().max() > 1e-3


def test_gradients_against_finite_differences():
    support, ys, query = episode(tasks=2, ways=3, shots=2, queries=2, d=4, seed=7)
    support.requires_grad_(True), query.requires_grad_(True)
    assert gradcheck(lambda s, q: cosine_log_probs(s, ys, q, 3), (support, query))
    assert gradgradcheck(lambda s, q: cosine_log_probs(s, ys, q, 3), (support, query))

    keys, p = list(fce_params(4)), fce_params(4)
    leaves = [p[k].clone().requires_grad_(True) for k in keys]

    def full(s, q, *weights):
        return matching_log_probs(dict(zip(keys, weights)), s, ys, q, 3, fce=True, fce_steps=2)

    assert gradcheck(full, (support, query, *leaves))
    # Second order through the LSTM cells (double backward), with respect to the embeddings.
    assert gradgradcheck(lambda s, q: full(s, q, *[w.detach() for w in leaves]), (support, query))
