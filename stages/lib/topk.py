"""The teacher's top-k next-token distribution at the completion positions of a packed row, the
LM head a chunk of positions at a time (stage `distributions`; provenance's teacher forward when
`provenance.topk` is set; an online teacher can call it too).

    teacher_topk(model, batch, k, vocab, chunk) -> {"ids" [K, k] int32, "logps" [K, k] fp32,
      "token_logp" [K], "tail" [K], "dropped" [K] int32, "padded_mass" [K],
      "full_token_logp" [K]}

`batch` is a packed row on the model's device (stages/lib/packed.py packed_row, as tensors);
K = len(batch["keep"]), the positions that predict completion tokens. The model's forward runs
once with logits_to_keep = those K positions, but its LM head only hands back its input (the
[K, H] hidden states); the head then runs on `chunk` positions at a time, so [K, vocab] logits
never exist at once (1,024 x 152k vocab x 4 B = 0.62 GB of fp32 logits a chunk, where a
32k-position row would be 19.9 GB). A model that changes its logits after the head (Gemma-2's
soft-capping: stages/lib/lm_head.py unchunked_reason) gets its own full logits, with a warning.

Log-probs are raw: temperature 1, the full softmax over the first `vocab` ids (the student's
vocabulary). Ids >= vocab (a teacher's padded embedding rows: Qwen2.5-7B has 152,064 rows, the
1.5B 151,936) are left out of the softmax, which is the teacher's distribution renormalised over
the student's ids: top-k + tail then sum to 1 over what the student can predict. `dropped` counts,
per position, the entries the teacher's full-vocabulary top-k would have spent on such ids;
`padded_mass` is the probability the position put on them (both 0 without padded ids).
`token_logp` is the target's log-prob in that renormalised softmax (-inf for a target >= vocab,
which only a scorer of another tokenizer's text meets); `full_token_logp` is its log-prob over
the model's whole vocabulary, the number stages/lib/packed.py score_token_ids gives (the same
arithmetic: bit for bit when the model has no padded rows), so one forward serves provenance's
scoring and the capture (TopkScorer).

Stored form (capture_fields / capture_arrays), what distributions writes per row and provenance
keeps per trace: ids int32 + log-probs fp16 = 6 B an entry; token_logp and tail in fp16.
"""
from __future__ import annotations

import contextlib
import logging

from pipeline.errors import UserError
from stages.lib.lm_head import module_forward, unchunked_reason
from stages.lib.packed import pack, packed_row

log = logging.getLogger(__name__)


def vocab_size(model: str, where: str, trust_remote_code: bool = False) -> int:
    """Rows of the model's embedding (its config's vocab_size: padded ones included)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    size = config.get_text_config().vocab_size
    if not size:
        raise UserError(f"{where} {model}: its config has no vocab_size")
    return int(size)


@contextlib.contextmanager
def _head_returns_input(head, captured: list):
    """Within the block, calling `head` returns its input unchanged (kept in `captured`)."""

    def forward(x, *args, **kwargs):
        captured.append(x)
        return x

    with module_forward(head, forward):
        yield


def _forward(model, batch, **kwargs):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                 max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                 logits_to_keep=batch["keep"], use_cache=False, **kwargs)


def teacher_topk(model, batch, k: int, vocab: int, chunk: int = 1024) -> dict:
    """The top-k of the teacher's next-token distribution over ids < `vocab` at every completion
    position of the packed row `batch` (module docstring). No gradient."""
    import torch

    head = model.get_output_embeddings()
    reason = unchunked_reason(model, grad=False)
    with torch.no_grad():
        if reason is None:
            captured: list = []
            with _head_returns_input(head, captured):
                _forward(model, batch)
            hidden = captured[-1].reshape(-1, captured[-1].shape[-1])   # [K, H]
            project = head
        else:
            log.warning("distributions: %s; computing the full-vocabulary logits of every "
                        "completion position at once (K x vocab x 4 B)", reason)
            hidden = _forward(model, batch).logits.reshape(-1, model.config.vocab_size)
            project = None
        targets = batch["targets"]
        n = hidden.shape[0]
        out = {"ids": torch.empty(n, k, dtype=torch.int32, device=hidden.device),
               "logps": torch.empty(n, k, dtype=torch.float32, device=hidden.device),
               "token_logp": torch.empty(n, dtype=torch.float32, device=hidden.device),
               "tail": torch.empty(n, dtype=torch.float32, device=hidden.device),
               "dropped": torch.zeros(n, dtype=torch.int32, device=hidden.device),
               "padded_mass": torch.zeros(n, dtype=torch.float32, device=hidden.device),
               "full_token_logp": torch.empty(n, dtype=torch.float32, device=hidden.device)}
        for a in range(0, n, chunk):
            z = hidden[a:a + chunk]
            z = (project(z) if project is not None else z).float()     # [chunk, teacher vocab]
            t = targets[a:a + chunk]
            full_picked = z.gather(1, t[:, None])[:, 0]
            padded = z.shape[1] > vocab
            if padded:  # padded rows: what the full top-k would have spent on them
                full = z.topk(k, dim=-1).indices
                out["dropped"][a:a + chunk] = (full >= vocab).sum(dim=-1).to(torch.int32)
                pad_lse = torch.logsumexp(z[:, vocab:], dim=-1)
                all_lse = torch.logsumexp(z, dim=-1)
                out["padded_mass"][a:a + chunk] = (pad_lse - all_lse).exp()
                out["full_token_logp"][a:a + chunk] = full_picked - all_lse
                z = z[:, :vocab]
            values, ids = z.topk(k, dim=-1)                               # descending
            inside = t < vocab
            picked = z.gather(1, t.clamp(max=vocab - 1)[:, None])[:, 0]
            # log-sum-exp in place (values[:, 0] is the row max): one [chunk, vocab] buffer.
            # The same steps as lm_head.chunk_logps, so full_token_logp matches scoring's.
            top = values[:, 0]
            lse = z.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            logps = values - lse[:, None]
            out["ids"][a:a + chunk] = ids.to(torch.int32)
            out["logps"][a:a + chunk] = logps
            out["token_logp"][a:a + chunk] = torch.where(inside, picked - lse, -torch.inf)
            if not padded:
                out["full_token_logp"][a:a + chunk] = full_picked - lse
            # 1 - sum of k probabilities: fp32 rounding can take it a few 1e-7 below 0
            out["tail"][a:a + chunk] = (1.0 - logps.exp().sum(dim=-1)).clamp_(min=0.0)
            del z
    return out


def packed_topk(model, seqs: list[tuple[list[int], int]], k: int, vocab: int,
                tokens_per_row: int, chunk: int = 1024) -> list[dict]:
    """[(token ids, prompt length)], each with at least one token after its prompt -> per
    sequence teacher_topk's arrays (numpy) for its n tokens after the prompt: "ids" [n, k],
    "logps" [n, k], "token_logp", "tail", "dropped", "padded_mass", "full_token_logp" [n].
    Sequences are packed best-fit into rows of tokens_per_row tokens (at least the longest; no
    padding), each row one teacher_topk call: the rows packed.score_token_ids makes of them."""
    import torch

    out: list[dict] = [{} for _ in seqs]
    capacity = max([tokens_per_row] + [len(ids) for ids, _ in seqs])
    device = next(model.parameters()).device
    for b in pack([len(ids) for ids, _ in seqs], capacity):
        row = packed_row([seqs[i] for i in b])
        batch = {key: torch.as_tensor(row[key], device=device)
                 for key in ("cu_seqlens", "keep", "targets")}
        batch["input_ids"] = torch.as_tensor(row["input_ids"], device=device)[None]
        batch["position_ids"] = torch.as_tensor(row["position_ids"], device=device)[None]
        batch["max_seqlen"] = row["max_seqlen"]
        got = {key: t.cpu().numpy() for key, t in teacher_topk(model, batch, k, vocab,
                                                                chunk).items()}
        at = 0
        for i in b:  # packed_row keeps the order of its samples
            m = len(seqs[i][0]) - seqs[i][1]
            out[i] = {key: a[at:at + m] for key, a in got.items()}
            at += m
    return out


class TopkScorer:
    """A drop-in for stages/lib/packed.py score_token_ids (score_completions' `score_ids`): the
    same per-sequence log-probs over the model's whole vocabulary, from ONE forward that also
    takes the top-k (packed_topk). After each call, `seqs` holds the (token ids, prompt length)
    it scored and `got` packed_topk's arrays per sequence (None for a sequence with no token
    after its prompt, which gets [] as score_token_ids gives it)."""

    def __init__(self, model, k: int, vocab: int, tokens_per_row: int, chunk: int = 1024):
        self.model, self.k, self.vocab = model, k, vocab
        self.tokens_per_row, self.chunk = tokens_per_row, chunk
        self.seqs: list = []
        self.got: list = []

    def __call__(self, seqs: list[tuple[list[int], int]]) -> list[list[float]]:
        todo = [i for i, (ids, n_prompt) in enumerate(seqs) if len(ids) > n_prompt]
        got = packed_topk(self.model, [seqs[i] for i in todo], self.k, self.vocab,
                          self.tokens_per_row, self.chunk) if todo else []
        self.seqs, self.got = list(seqs), [None] * len(seqs)
        for i, g in zip(todo, got):
            self.got[i] = g
        return [g["full_token_logp"].tolist() if g is not None else [] for g in self.got]


# --- the stored form ---------------------------------------------------------------------------

def capture_fields() -> list:
    """(name, Arrow type) of the stored top-k columns, one value a row (a sequence)."""
    import pyarrow as pa

    return [("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logps", pa.list_(pa.list_(pa.float16()))),
            ("token_logp", pa.list_(pa.float16())), ("tail_mass", pa.list_(pa.float16())),
            ("padded_dropped", pa.int32()), ("padded_mass_max", pa.float32())]


def _lists(arrays: list, typ):
    """list<typ> (1-D numpy arrays) or list<list<typ>> ([n, k] arrays) from one array a row."""
    import numpy as np
    import pyarrow as pa

    def offsets(lengths):
        return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    flat = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), typ)
    if arrays[0].ndim == 2:
        k, n = arrays[0].shape[1], sum(len(a) for a in arrays)
        flat = pa.ListArray.from_arrays(offsets([k] * n), flat)
    return pa.ListArray.from_arrays(offsets([len(a) for a in arrays]), flat)


def capture_arrays(got: list, k: int) -> dict:
    """{name: Arrow array} in capture_fields' types from packed_topk's per-sequence arrays
    (None: a row with empty lists, nothing dropped)."""
    import numpy as np
    import pyarrow as pa

    none = {"ids": np.empty((0, k), np.int32), "logps": np.empty((0, k), np.float32),
            "token_logp": np.empty(0, np.float32), "tail": np.empty(0, np.float32),
            "dropped": np.empty(0, np.int32), "padded_mass": np.empty(0, np.float32)}
    got = [g if g is not None else none for g in got]
    f16 = pa.float16()
    return {
        "topk_ids": _lists([g["ids"] for g in got], pa.int32()),
        # fp16: |x| * 2^-11 rounding at most (4.9e-4 relative), 2 B an entry
        "topk_logps": _lists([g["logps"].astype(np.float16) for g in got], f16),
        "token_logp": _lists([g["token_logp"].astype(np.float16) for g in got], f16),
        "tail_mass": _lists([g["tail"].astype(np.float16) for g in got], f16),
        "padded_dropped": pa.array([int(g["dropped"].sum()) for g in got], pa.int32()),
        "padded_mass_max": pa.array([float(g["padded_mass"].max()) if len(g["padded_mass"])
                                     else 0.0 for g in got], pa.float32()),
    }


def bytes_per_token(k: int) -> int:
    """Uncompressed bytes a position costs: k x (int32 id + fp16 log-prob) + token_logp (fp16) +
    tail_mass (fp16) + the completion id (int32). k=32: 192 + 8 = 200."""
    return 6 * k + 8
