"""The rejection sampler keeps the target's distribution exactly, whatever the drafts: tested on synthetic
p/q with a draft far from the target (40,000 seeded draws, chi-square), and a sampler that always accepts
must fail the same check."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gpu_worker.config import SamplingParams
from gpu_worker.runner.rejection_sampler import first_rejections, rejection_sample, target_probs
from gpu_worker.runner.sampler import SamplingMetadata, draw
from gpu_worker.spec.ngram import lookup

V = 6  # vocabulary of the synthetic model
N = 40_000  # sequences, each verified with 2 drafts in one batch
P_VALUE_FLOOR = 1e-3  # fixed seeds: the statistic is deterministic; an exact sampler sits far above this

Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Return the chi-square goodness-of-fit p-value of counts against expected counts (cells > 0)."""
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


def _synthetic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return target p0 [V], p1 [V, V] (given the first token), and draft q0 [V], q1 [V, V] far from them."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    p1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, 1)
    # The draft puts most of its mass where the target puts least.
    q0 = torch.softmax(-torch.log(p0) * 1.5, 0)
    q1 = torch.softmax(-torch.log(p1) * 1.5, 1)
    return p0, p1, q0, q1


def _first_two_tokens(sampler: Sampler, seed: int = 1, one_hot: bool = False) -> torch.Tensor:
    """Return N samples of the first two tokens [N, 2]: each sequence drafts two tokens from q, the target
    verifies them in one batch of 3 rows each, and a sequence rejected at row 0 draws its second token
    from p1 in a following step (as the engine would). one_hot: certain drafts (as n-gram ones), the
    target's second least likely token each time."""
    p0, p1, q0, q1 = _synthetic()
    g = torch.Generator().manual_seed(seed)
    if one_hot:
        second_least = p0.argsort()[1].item(), p1.argsort(1)[:, 1]
        q0 = torch.nn.functional.one_hot(torch.tensor(second_least[0]), V).float()
        q1 = torch.nn.functional.one_hot(second_least[1], V).float()
    x0 = torch.multinomial(q0, N, replacement=True, generator=g)
    x1 = torch.multinomial(q1[x0], 1, generator=g).squeeze(1)
    p_rows = torch.stack([p0.expand(N, V), p1[x0], p1[x1]], 1).reshape(3 * N, V)  # bonus row: any p works
    q_rows = torch.stack([q0.expand(N, V), q1[x0], torch.zeros(N, V)], 1).reshape(3 * N, V)
    drafts = torch.stack([x0, x1, torch.full_like(x0, -1)], 1).reshape(3 * N)
    torch.manual_seed(seed)
    accepted, recovered = sampler(p_rows, q_rows, drafts, [None] * (3 * N))
    chosen = torch.where(accepted, drafts, recovered).view(N, 3)
    num_accepted = torch.tensor(first_rejections(accepted.tolist(), [3] * N))
    first = chosen[:, 0]
    second = torch.where(num_accepted >= 1, chosen[:, 1], draw(p1[first], [None] * N))
    return torch.stack([first, second], 1)


def _p_value(sampler: Sampler, one_hot: bool = False) -> float:
    p0, p1, _, _ = _synthetic()
    pairs = _first_two_tokens(sampler, one_hot=one_hot)
    observed = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    expected = (p0[:, None] * p1).flatten().double() * N
    return chi_square_p_value(observed, expected)


@pytest.mark.parametrize("one_hot", [False, True], ids=["far-draft-model", "certain-drafts"])
def test_it_keeps_the_target_distribution_with_a_far_draft(one_hot: bool) -> None:
    p_value = _p_value(rejection_sample, one_hot)
    assert p_value > P_VALUE_FLOOR, p_value


def _always_accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, gens: list) -> tuple:  # type: ignore[type-arg]
    accepted, recovered = rejection_sample(p, q, drafts, gens)
    return drafts >= 0, recovered


def _accept_without_ratio(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, gens: list) -> tuple:  # type: ignore[type-arg]
    """A classic bug: accept with probability p(x) instead of p(x)/q(x), recover from p instead of p - q."""
    rows = torch.arange(p.shape[0])
    accepted = (drafts >= 0) & (torch.rand(p.shape[0]) < p[rows, drafts.clamp(min=0)])
    return accepted, draw(p, gens)


@pytest.mark.parametrize("mutant", [_always_accept, _accept_without_ratio])
@pytest.mark.parametrize("one_hot", [False, True], ids=["far-draft-model", "certain-drafts"])
def test_the_distribution_check_fails_a_wrong_sampler(mutant: Sampler, one_hot: bool) -> None:
    assert _p_value(mutant, one_hot) < P_VALUE_FLOOR


def test_greedy_rows_accept_exactly_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    meta = SamplingMetadata.build([SamplingParams(temperature=0.0)] * 3, 3, torch.device("cpu"))
    p = target_probs(logits, meta)
    q = torch.zeros(3, 3)
    q[0, 1] = q[1, 2] = 1.0  # draft 1 (the argmax: kept), draft 2 (not: rejected)
    accepted, recovered = rejection_sample(p, q, torch.tensor([1, 2, -1]), [None] * 3)
    assert accepted.tolist() == [True, False, False]
    assert recovered.tolist() == [1, 0, 2]
    assert first_rejections(accepted.tolist(), [2, 1]) == [1, 0]


def test_seeded_rows_repeat_their_draws() -> None:
    p = torch.softmax(torch.randn(4, 10), 1)
    q = torch.softmax(torch.randn(4, 10), 1)
    drafts = torch.tensor([3, 5, 7, -1])

    def run() -> tuple[list[bool], list[int]]:
        gens = [torch.Generator().manual_seed(5) for _ in range(4)]
        accepted, recovered = rejection_sample(p, q, drafts, gens)  # type: ignore[arg-type]
        return accepted.tolist(), recovered.tolist()

    assert run() == run()


def test_ngram_lookup_continues_the_latest_longest_match() -> None:
    ids = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert lookup(ids, 3) == [4, 5, 7]  # "2 3" last seen before "4 5 7"
    assert lookup([1, 2, 3, 4], 2) == []
    assert lookup([5, 5, 5], 4) == [5]
    assert lookup(ids, 0) == []
