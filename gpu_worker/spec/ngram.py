"""N-gram prompt lookup: the continuation of the latest earlier occurrence of a sequence's last n tokens
(longest n first). No weights; drafts are certain (one-hot q), so the target accepts each with p(draft)."""

from __future__ import annotations

from array import array

from gpu_worker.sequence import Sequence
from gpu_worker.spec.proposer import Proposal


def lookup(ids: list[int], k: int, max_n: int = 4, min_n: int = 1) -> list[int]:
    """Return up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    if k <= 0:
        return []
    data = array("q", ids).tobytes()
    width = array("q").itemsize
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        suffix = data[len(data) - n * width :]
        end = len(data) - width  # a match must end before the suffix's own last token
        while True:
            at = data.rfind(suffix, 0, end)
            if at < 0:
                break
            if at % width == 0:
                start = at // width + n
                return ids[start : start + k]
            end = at + len(suffix) - 1
    return []


class NgramProposer:
    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [
            Proposal(lookup(seq.token_ids, k, self.max_n, self.min_n))
            for seq, k in zip(seqs, num_tokens, strict=True)
        ]

    def release(self, seqs: list[Sequence]) -> None:
        pass

    def capture_graphs(self, max_rows: int, max_batch: int) -> None:
        pass
