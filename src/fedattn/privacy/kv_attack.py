"""``fedattn attack``: how much of a party's private text the K/V it exchanges give away.

The attacker is an honest-but-curious party with the same weights. At a sync block it receives
the victim's K/V frame (through the run's KV codec, after the sender's defenses) and the global
positions, and guesses the victim's token at every position. Two attacks:

* **Block 0, vocabulary table.** K and V at block 0 are a function of (token, position) alone:
  K = RoPE(W_k RMSNorm(embed(t)) + b_k, p), V = W_v RMSNorm(embed(t)) + b_v. The table of
  [pre-RoPE K, V] over the whole vocabulary is built once with the model's own modules; a
  received key is rotated back by its (public) position, and each token is matched to its nearest
  table row. The distance is weighted by the expected error per channel (the noise, whose spread
  the attacker estimates from what it received, plus rounding), which is the maximum-likelihood
  match under Gaussian noise.
* **Deeper blocks, ridge probe.** K/V at block l > 0 depend on the sender's whole prefix, so no
  table exists. A linear (ridge) map from the concatenated K/V of every KV head to the token's
  unit input embedding is fitted on public text (GSM8K train questions, packed, half of them
  behind the chat template's opening at position 0 and half at a random offset, like the
  segments a first and a later party send), and a token is guessed as the vocabulary entry whose
  embedding is closest in cosine. Keys are rotated back by their positions first (``--keys
  unrotated``, the default; ``as-sent`` keeps the rotated keys). A ridge map rather than kNN over
  the collected pairs because it can name tokens the public text never contained (names, codes),
  it fits in seconds and it knows the noise: with noise of relative spread sigma the fit adds
  sigma^2 to the diagonal of the standardized Gram matrix, the expected effect of that noise on
  the training features (noise-aware ridge).
* **Verification** (``--verify K``, off by default): left to right, the probe's top K candidates
  are run behind the prefix recovered so far and the one whose recomputed K/V is closest to what
  was received is kept (see ``verify_segment``). Exact behind a correct prefix, but errors
  propagate; it costs one batched forward pass per token through the blocks up to the attacked one.

Victims: each collaborator segment of CrossFacts items (``--source crossfacts``, three parties:
two documents per item), or a GSM8K test question as a first party's segment (``--source
gsm8k``), with the chat template when the model has one. A victim's K/V are computed over its own
segment at its global positions with local attention: exactly what a first party sends at any
block, and what a later party sends before it has received anything. Only the tokens of the
party's own text count; the template's tokens are public.

Matching runs in two stages: a bfloat16 score against the whole vocabulary picks a shortlist,
then exact float32 scores pick among it, so rounding cannot decide between close candidates.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedattn.argtypes import non_negative_float, non_negative_int, positive_int
from fedattn.errors import FedAttnError
from fedattn.network.frames import KVBlock, KVExpectation, decode_kv, encode_kv
from fedattn.network.kv_codec import KVCodec
from fedattn.privacy.noise import add_kv_noise
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.prompting import Piece, chat_template_parts, collaborator_pieces, party_pieces, tokenize_pieces
from fedattn.runtime.seeding import seeded_generator

if TYPE_CHECKING:
    from fedattn.evaluation.plots import Drawn

DEFAULT_NOISE = (0.0, 0.1, 0.3, 1.0)
DEFAULT_TRAIN_TOKENS = 8000
TRAIN_SEQUENCE = 256  # tokens per packed probe-training sequence
MAX_TRAIN_OFFSET = 256  # later-party training sequences start at a random position below this
CROSSFACTS_PARTIES = 3  # two collaborators' documents per item
RIDGE = 1e-3  # ridge penalty on standardized features (relative to the Gram matrix's unit diagonal)
ROUNDING = 2.0**-8  # relative rounding error assumed per channel (bfloat16): the floor of the match weights
SHORTLIST = 16  # candidates rescored exactly after the bfloat16 pass
QUERY_CHUNK = 256  # rows scored against the vocabulary at once (256 x 152k float32 = 155 MB)
VOCAB_CHUNK = 16384
SAMPLE_TOKENS = 48  # tokens of the first victim shown, true and recovered, in each record
KEY_MODES = ("unrotated", "as-sent")


# -- victims -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Victim:
    """One party's segment as the attacker would see it sent: ids, global start, which are private."""

    token_ids: list[int]
    first_position: int
    private: list[bool]  # False for chat-template tokens (public knowledge)

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.first_position, self.first_position + len(self.token_ids))


def _victim(tokenizer, pieces: list[Piece], first_position: int) -> Victim:
    ids: list[int] = []
    private: list[bool] = []
    for piece in pieces:
        piece_ids = tokenize_pieces(tokenizer, [piece])
        ids += piece_ids
        private += [not piece.template] * len(piece_ids)
    return Victim(ids, first_position, private)


def crossfacts_victims(tokenizer, count: int, data_seed: int) -> list[Victim]:
    """``count`` collaborator segments, in order, from CrossFacts items of three parties."""
    from fedattn.evaluation.tasks.crossfacts import generate_item

    template = chat_template_parts(tokenizer)
    victims: list[Victim] = []
    index = 0
    while len(victims) < count:
        item = generate_item(data_seed, index, CROSSFACTS_PARTIES, 4)
        position = 0
        for pieces in party_pieces(list(item.documents), item.question, None, template)[:-1]:
            victim = _victim(tokenizer, pieces, position)
            victims.append(victim)
            position += len(victim.token_ids)
        index += 1
    return victims[:count]


def gsm8k_victims(tokenizer, count: int) -> list[Victim]:
    """The first ``count`` GSM8K test questions, each a first party's segment."""
    from fedattn.evaluation.tasks.gsm8k import load

    template = chat_template_parts(tokenizer)
    return [
        _victim(tokenizer, collaborator_pieces(problem.question, True, template), 0) for problem in load("test")[:count]
    ]


SOURCES = {"crossfacts": crossfacts_victims, "gsm8k": lambda tokenizer, count, _seed: gsm8k_victims(tokenizer, count)}


def public_sequences(tokenizer, tokens: int, seed: int) -> list[Victim]:
    """Probe-training text: GSM8K train questions packed into sequences of ``TRAIN_SEQUENCE`` tokens,
    alternately behind the chat opening at position 0 and bare at a random offset, ``tokens`` in all."""
    from fedattn.evaluation.tasks.gsm8k import load

    template = chat_template_parts(tokenizer)
    opening = tokenize_pieces(tokenizer, [Piece(template[0], True)]) if template else []
    rng = random.Random(f"attack-probe:{seed}")
    questions = iter(load("train"))
    sequences: list[Victim] = []
    total = 0
    while total < tokens:
        first = len(sequences) % 2 == 0
        ids = list(opening) if first else []
        while len(ids) < TRAIN_SEQUENCE:
            problem = next(questions, None)
            if problem is None:
                raise FedAttnError(f"GSM8K train has fewer than {tokens} tokens of questions; lower --train-tokens")
            ids += tokenizer(problem.question + "\n\n", add_special_tokens=False).input_ids
        ids = ids[: min(TRAIN_SEQUENCE, tokens - total)]
        sequences.append(Victim(ids, 0 if first else rng.randrange(MAX_TRAIN_OFFSET), [True] * len(ids)))
        total += len(ids)
    return sequences


# -- what a sender computes and a receiver gets ---------------------------------------------------
class _Recorder:
    """A forward step for one party's local causal pass that keeps the K/V of chosen blocks."""

    def __init__(self, positions: torch.Tensor, blocks: set[int]) -> None:
        self.positions = positions
        self.blocks = blocks
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, query=None, scaling=None):
        if layer in self.blocks:
            self.captured[layer] = (key[0].clone(), value[0].clone())
        mask = self.positions.unsqueeze(0) <= self.positions.unsqueeze(1)
        return key, value, mask


@torch.inference_mode()
def capture_kv(
    model: torch.nn.Module, victim: Victim, blocks: set[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The K/V (heads, tokens, head_dim) the victim computes at ``blocks`` over its own segment."""
    positions = victim.positions.to(model.device)
    recorder = _Recorder(positions, blocks)
    ids = torch.tensor([victim.token_ids], device=model.device)
    with federated_attention_enabled(model):
        model.base_model(input_ids=ids, position_ids=positions.unsqueeze(0), fedattn_step=recorder, use_cache=False)
    return recorder.captured


def received(
    key: torch.Tensor,
    value: torch.Tensor,
    victim: Victim,
    layer: int,
    codec: KVCodec,
    sigma: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the attacker decodes: the sender's noise, then a real frame through ``codec`` and back."""
    key, value = add_kv_noise(key, value, sigma, generator)
    heads, tokens, head_dim = key.shape
    frame = encode_kv(KVBlock(layer, victim.positions, key, value), codec, whole_segment=True)
    start = victim.first_position
    expect = KVExpectation("victim", layer, heads, head_dim, tokens, (start, start + tokens))
    block = decode_kv(frame, expect, codec)
    return block.key.float(), block.value.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(model: torch.nn.Module, key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Undo RoPE at the (public) positions: the inverse rotation k cos - rotate_half(k) sin."""
    cos, sin = model.base_model.rotary_emb(key, positions.unsqueeze(0).to(key.device))
    return key * cos - _rotate_half(key) * sin


def features(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(tokens, 2 * heads * head_dim): every KV head's K then V, in the projections' own layout."""
    tokens = key.shape[1]
    return torch.cat([key.transpose(0, 1).reshape(tokens, -1), value.transpose(0, 1).reshape(tokens, -1)], dim=1)


# -- matching ------------------------------------------------------------------------------------
def shortlist(queries: torch.Tensor, table: torch.Tensor, bias: torch.Tensor, size: int = SHORTLIST) -> torch.Tensor:
    """(N, size) ids of the rows with the highest query . row + bias, scored in bfloat16 (fast)."""
    coarse = table.to(torch.bfloat16)
    size = min(size, table.shape[0])
    picks = []
    for chunk in queries.split(QUERY_CHUNK):
        scores = (chunk.to(torch.bfloat16) @ coarse.T).float() + bias
        picks.append(scores.topk(size, dim=1).indices)
    return torch.cat(picks)


@torch.inference_mode()
def vocabulary_table(model: torch.nn.Module) -> torch.Tensor:
    """(vocab, features) pre-RoPE K and V at block 0 of every token, by the model's own modules."""
    base = model.base_model
    layer = base.layers[0]
    rows = []
    for ids in torch.arange(base.embed_tokens.num_embeddings, device=model.device).split(VOCAB_CHUNK):
        hidden = layer.input_layernorm(base.embed_tokens(ids))
        rows.append(torch.cat([layer.self_attn.k_proj(hidden), layer.self_attn.v_proj(hidden)], dim=1).float())
    return torch.cat(rows)


def match_weights(received_features: torch.Tensor, sigma: float) -> torch.Tensor:
    """1 / expected squared error per channel: the sender's noise (its spread estimated from what
    was received, which is the clean spread inflated by 1 + sigma^2) plus bfloat16 rounding."""
    spread2 = received_features.var(dim=0, correction=0) / (1.0 + sigma**2)
    rounding2 = (ROUNDING**2) * received_features.pow(2).mean(dim=0)
    return 1.0 / (sigma**2 * spread2 + rounding2 + torch.finfo(torch.float32).tiny)


def table_attack(table: torch.Tensor, queries: torch.Tensor, sigma: float) -> torch.Tensor:
    """Nearest table row to each query under the weighted distance of ``match_weights``."""
    root = match_weights(queries, sigma).sqrt()
    weighted_table, weighted = table * root, queries * root
    candidates = shortlist(2 * weighted, weighted_table, -weighted_table.pow(2).sum(dim=1))
    distances = (weighted_table[candidates] - weighted.unsqueeze(1)).pow(2).sum(dim=2)
    return candidates.gather(1, distances.argmin(dim=1, keepdim=True)).squeeze(1)


@dataclass
class RidgeProbe:
    """Sufficient statistics of a ridge map from standardized K/V features to unit embeddings."""

    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    gram: torch.Tensor  # (F, F) standardized X^T X / n
    cross: torch.Tensor  # (F, D) standardized X^T Y / n, Y centred
    target_mean: torch.Tensor  # (D,)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor) -> RidgeProbe:
        x, y = x.double(), y.double()
        mean, scale = x.mean(dim=0), x.std(dim=0, correction=0).clamp_min(1e-12)
        standard = (x - mean) / scale
        target_mean = y.mean(dim=0)
        return cls(mean, scale, standard.T @ standard / len(x), standard.T @ (y - target_mean) / len(x), target_mean)

    def weights(self, sigma: float) -> torch.Tensor:
        """(F, D) map; noise of relative spread sigma adds sigma^2 to the standardized diagonal."""
        return self.weights_under_noise(sigma**2 * self.scale**2)

    def weights_under_noise(self, variance: torch.Tensor | float) -> torch.Tensor:
        """(F, D) map for features received with independent noise of ``variance`` per feature (raw
        units): its expected effect on the standardized Gram matrix is variance / scale^2 on the diagonal."""
        diagonal = RIDGE + torch.as_tensor(variance, dtype=self.gram.dtype) / self.scale**2
        return torch.linalg.solve(self.gram + torch.diag(diagonal.expand(len(self.gram))), self.cross)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.scale).float()


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.float()
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def probe_candidates(
    probe: RidgeProbe, weights: torch.Tensor, embeddings: torch.Tensor, queries: torch.Tensor, size: int = SHORTLIST
) -> torch.Tensor:
    """(N, size) vocabulary entries by cosine of their embedding to the probe's prediction (by its
    map ``weights``, see ``RidgeProbe.weights``), best first.

    The shortlist scores x . (W e_v) + mean . e_v over unit embeddings e_v, so the vocabulary is
    projected once into the (small) feature space instead of every prediction into the vocabulary.
    """
    weights = weights.float()
    target_mean = probe.target_mean.float()
    projected, bias = [], []
    for rows in embeddings.split(VOCAB_CHUNK):
        unit = unit_rows(rows)
        projected.append((unit.to(torch.bfloat16) @ weights.T.to(torch.bfloat16)).float())
        bias.append(unit @ target_mean)
    standard = probe.standardize(queries)
    candidates = shortlist(standard, torch.cat(projected), torch.cat(bias), size)
    predicted = unit_rows(standard @ weights + target_mean)
    cosine = (unit_rows(embeddings[candidates]) * predicted.unsqueeze(1)).sum(dim=2)
    return candidates.gather(1, cosine.argsort(dim=1, descending=True))


# -- the experiment -------------------------------------------------------------------------------
@dataclass
class AttackSetup:
    """Everything fixed before the (block, noise) grid: model, victims and their clean K/V, the attacks' tables."""

    model: torch.nn.Module
    tokenizer: object
    codec: KVCodec
    victims: list[Victim]
    captured: list[dict[int, tuple[torch.Tensor, torch.Tensor]]]
    unrotated_keys: bool
    seed: int
    table: torch.Tensor | None  # block 0's vocabulary table (None when block 0 is not attacked)
    probes: dict[int, RidgeProbe]
    verify: int = 0  # deep blocks: check the probe's top-k by recomputing K/V behind the recovered prefix (0: off)


def received_frames(setup: AttackSetup, block: int, sigma: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every victim's (key, value) at ``block`` as the attacker decodes it under noise ``sigma``."""
    generator = seeded_generator("attack", setup.seed, block, sigma)
    return [
        received(*captured[block], victim, block, setup.codec, sigma, generator)
        for victim, captured in zip(setup.victims, setup.captured)
    ]


def private_features(setup: AttackSetup, block: int, frames: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The attacks' features of every victim's private tokens (keys rotated back where they need it)."""
    rows = []
    for victim, (key, value) in zip(setup.victims, frames):
        if block == 0 or setup.unrotated_keys:
            key = unrotate(setup.model, key, victim.positions)
        rows.append(features(key, value)[torch.tensor(victim.private)])
    return torch.cat(rows)


def attack_block(setup: AttackSetup, block: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(guessed ids, true ids) of the victims' private tokens at ``block`` under noise ``sigma``."""
    frames = received_frames(setup, block, sigma)
    queries = private_features(setup, block, frames)
    truth = torch.tensor(
        [token for victim in setup.victims for token, private in zip(victim.token_ids, victim.private) if private]
    )
    if block == 0:
        return table_attack(setup.table, queries, sigma), truth
    embeddings = setup.model.base_model.embed_tokens.weight.detach()
    probe = setup.probes[block]
    candidates = probe_candidates(probe, probe.weights(sigma), embeddings, queries)
    if not setup.verify:
        return candidates[:, 0], truth
    weights = match_weights(torch.cat([features(key, value) for key, value in frames]), sigma)
    counts = [sum(victim.private) for victim in setup.victims]
    guessed = [
        verify_segment(setup.model, victim, features(*frame), shortlist_rows[:, : setup.verify], weights, block)
        for victim, frame, shortlist_rows in zip(setup.victims, frames, candidates.split(counts))
    ]
    return torch.cat(guessed), truth


class _Stop(Exception):
    """Raised after the attacked block: the blocks above it cannot change its K/V."""


class PrefixStep:
    """A forward step for candidate tokens at one position (one per batch row): each attends to the
    K/V of the prefix recovered so far; the pass stops once block ``block``'s K/V are known (a pass
    that never reaches ``block`` runs to its end: ``hidden_attack`` reads hidden states that way)."""

    def __init__(self, block: int, capacity: int) -> None:
        self.block = block
        self.length = 0
        self.capacity = capacity
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, query=None, scaling=None):
        self.fresh[layer] = (key[:, :, 0], value[:, :, 0])  # (candidates, heads, head_dim)
        if layer == self.block:
            raise _Stop
        if layer not in self.store:
            shape = (key.shape[1], self.capacity, key.shape[3])
            self.store[layer] = (key.new_empty(shape), value.new_empty(shape))
        keys, values = (
            part[:, : self.length].unsqueeze(0).expand(key.shape[0], -1, -1, -1) for part in self.store[layer]
        )
        return torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2), None

    def keep(self, row: int) -> None:
        """Append candidate ``row``'s K/V at every block below the attacked one to the prefix."""
        for layer, (keys, values) in self.store.items():
            key, value = self.fresh[layer]
            keys[:, self.length], values[:, self.length] = key[row], value[row]
        self.length += 1


@torch.inference_mode()
def verify_segment(
    model: torch.nn.Module,
    victim: Victim,
    sent: torch.Tensor,
    candidates: torch.Tensor,
    weights: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """Left to right, recompute the attacked block's K/V of each candidate token behind the prefix
    recovered so far and keep the one closest to what was received (weighted as ``match_weights``).

    Behind a correct prefix the true token's K/V match up to noise and rounding (exact recovery
    whenever it is shortlisted), but one wrong or unlisted token shifts every later position's
    K/V: on the tiny model this lifts block 1 from 84% to 97% and lowers the last block (48% to
    29%), so it is an option, not the default. Template tokens are public, so they are taken as
    known. Returns the guesses of the private tokens.
    """
    step = PrefixStep(block, len(victim.token_ids))
    guesses = iter(candidates.tolist())
    chosen = []
    with federated_attention_enabled(model):
        for index, (token, private) in enumerate(zip(victim.token_ids, victim.private)):
            options = next(guesses) if private else [token]
            ids = torch.tensor(options, device=model.device).unsqueeze(1)
            positions = torch.full_like(ids, victim.first_position + index)
            try:
                model.base_model(input_ids=ids, position_ids=positions, fedattn_step=step, use_cache=False)
            except _Stop:
                pass
            key, value = step.fresh[block]
            computed = torch.cat([key.reshape(len(options), -1), value.reshape(len(options), -1)], dim=1).float()
            best = int(((computed - sent[index]).pow(2) * weights).sum(dim=1).argmin())
            step.keep(best)
            if private:
                chosen.append(options[best])
    return torch.tensor(chosen)


def train_probes(
    model, tokenizer, blocks: set[int], tokens: int, seed: int, unrotated_keys: bool, advance
) -> dict[int, RidgeProbe]:
    """One ridge probe per block, fitted on K/V of public text (``public_sequences``)."""
    if not blocks:
        return {}
    per_block: dict[int, list[torch.Tensor]] = {block: [] for block in blocks}
    ids = []
    for sequence in public_sequences(tokenizer, tokens, seed):
        for block, (key, value) in capture_kv(model, sequence, blocks).items():
            key = key.float()
            if unrotated_keys:
                key = unrotate(model, key, sequence.positions)
            per_block[block].append(features(key, value.float()))
        ids += sequence.token_ids
        advance(len(sequence.token_ids))
    targets = unit_rows(model.base_model.embed_tokens.weight.detach()[torch.tensor(ids)])
    return {block: RidgeProbe.fit(torch.cat(rows), targets) for block, rows in per_block.items()}


class LooseForm:
    """A token's text lower-cased without surrounding whitespace: ' Marta' and 'marta' agree."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token]).strip().lower()
        return self.cache[token]


def score(guessed: torch.Tensor, truth: torch.Tensor, loose: LooseForm) -> dict:
    exact = int((guessed == truth).sum())
    close = sum(loose(int(a)) == loose(int(b)) for a, b in zip(guessed.tolist(), truth.tolist()))
    total = len(truth)
    return {
        "tokens": total,
        "recovered": exact,
        "rate": exact / total,
        "loose_recovered": close,
        "loose_rate": close / total,
    }


def sample_text(tokenizer, victim: Victim, guessed: torch.Tensor) -> dict:
    """``victim``'s first private tokens, true and as recovered (``guessed`` starts with its guesses), as text."""
    first = [token for token, private in zip(victim.token_ids, victim.private) if private]
    count = min(SAMPLE_TOKENS, len(first))
    return {"true": tokenizer.decode(first[:count]), "recovered": tokenizer.decode(guessed[:count].tolist())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- command line ---------------------------------------------------------------------------------
def default_blocks(num_layers: int) -> tuple[int, ...]:
    """0, 1, 2, then about every sixth of the depth, and the last block (24 -> 0,1,2,4,8,12,16,23)."""
    picks = {0, 1, 2, num_layers - 1} | {num_layers * k // 6 for k in range(1, 5)}
    return tuple(sorted(block for block in picks if 0 <= block < num_layers))


def noise_levels(text: str) -> tuple[float, ...]:
    """'0,0.1,0.3,1' -> the sigmas, each a finite number >= 0, in order, without repeats."""
    values = [non_negative_float(part) for part in filter(None, (part.strip() for part in text.split(",")))]
    if not values:
        raise argparse.ArgumentTypeError("--noise names no level")
    return tuple(dict.fromkeys(values))


def verify_size(text: str) -> int:
    """--verify K: 0 (off) up to the probe's shortlist."""
    value = non_negative_int(text)
    if value > SHORTLIST:
        raise argparse.ArgumentTypeError(f"--verify must be in 0..{SHORTLIST}, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, dtype: str, seed_help: str, out_help: str) -> None:
    """What every attack command takes: the model, the victims (``SOURCES``), seeds, where it runs
    and its results folder."""
    from fedattn.argtypes import device_name
    from fedattn.runtime.models import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a known model name, 'tiny-random', or a local HF directory / GGUF file (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--source",
        choices=tuple(SOURCES),
        default="crossfacts",
        help="victims' private text: CrossFacts documents or GSM8K test questions (default crossfacts)",
    )
    parser.add_argument(
        "--count", "--limit", dest="count", type=positive_int, default=20, help="victim segments attacked (default 20)"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the CrossFacts items")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument(
        "--dtype",
        default=dtype,
        choices=["float32", "bfloat16", "float16"],
        help=f"compute dtype of the model (default {dtype})",
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, required=True, help=out_help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedattn.systems.fedattn.config import block_list, codec_name

    add_common_arguments(
        parser,
        "bfloat16",
        "seed of the noise and of the probe's training offsets",
        "results folder: records.jsonl, summary.json, recovery.png; reruns resume",
    )
    parser.add_argument(
        "--blocks",
        type=block_list,
        metavar="0,1,4,8",
        help="sync blocks to attack, list or ranges (default 0, 1, 2, every sixth of the depth, the last)",
    )
    parser.add_argument(
        "--noise",
        type=noise_levels,
        default=DEFAULT_NOISE,
        metavar="0,0.1,0.3,1",
        help="sender noise levels sigma (times each channel's spread; see defenses.add_kv_noise)",
    )
    parser.add_argument(
        "--kv-codec",
        type=codec_name,
        default="bfloat16",
        help="the K/V codec on the wire (see fedattn run --help; default bfloat16)",
    )
    parser.add_argument(
        "--train-tokens",
        type=positive_int,
        default=DEFAULT_TRAIN_TOKENS,
        help=f"public-text tokens the deep-block probe is fitted on (default {DEFAULT_TRAIN_TOKENS})",
    )
    parser.add_argument(
        "--verify",
        type=verify_size,
        default=0,
        metavar="K",
        help=f"deep blocks: check the probe's top K (<= {SHORTLIST}) by recomputing their K/V behind the prefix "
        "recovered so far (slow: one batched step per token; default 0, off)",
    )
    parser.add_argument(
        "--keys",
        choices=KEY_MODES,
        default="unrotated",
        help="probe features: keys rotated back by their positions (default) or as sent",
    )


def _config(args: argparse.Namespace, loaded, blocks: tuple[int, ...]) -> dict:
    return {
        "model": {"name": loaded.name, "identity": loaded.identity, "dtype": args.dtype},
        "blocks": list(blocks),
        "noise": list(args.noise),
        "kv_codec": args.kv_codec,
        "source": args.source,
        "count": args.count,
        "train_tokens": args.train_tokens,
        "keys": args.keys,
        "verify": args.verify,
        "data_seed": args.data_seed,
        "seed": args.seed,
    }


def _record_key(block: int, sigma: float) -> str:
    return f"block={block} noise={sigma:g}"


def _setup(args: argparse.Namespace, loaded, codec: KVCodec, blocks: tuple[int, ...], costs: dict) -> AttackSetup:
    from fedattn.report.render import progress_bar

    model, tokenizer = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    victims = SOURCES[args.source](tokenizer, args.count, args.data_seed)
    with progress_bar("victims' K/V", len(victims)) as advance:
        captured = []
        for victim in victims:
            captured.append(capture_kv(model, victim, set(blocks)))
            advance()
    costs["victims_s"] = time.perf_counter() - start
    start = time.perf_counter()
    table = vocabulary_table(model) if 0 in blocks else None
    costs["vocabulary_table_s"] = time.perf_counter() - start
    costs["vocabulary_table_mb"] = 0.0 if table is None else table.numel() * 4 / 2**20
    start = time.perf_counter()
    unrotated = args.keys == "unrotated"
    deep = {block for block in blocks if block > 0}
    with progress_bar("probe training text", args.train_tokens if deep else 0) as advance:
        probes = train_probes(model, tokenizer, deep, args.train_tokens, args.seed, unrotated, advance)
    costs["probe_fit_s"] = time.perf_counter() - start
    return AttackSetup(model, tokenizer, codec, victims, captured, unrotated, args.seed, table, probes, args.verify)


def run(args: argparse.Namespace) -> int:
    """Attack every (block, noise) pair not yet in --out; one record each, then the summary and the plot."""
    from fedattn.argtypes import naming_option
    from fedattn.evaluation.harness import pending, run_batches
    from fedattn.evaluation.results import ResultStore
    from fedattn.evaluation.tasks import gsm8k
    from fedattn.network.kv_codec import get_codec
    from fedattn.runtime.devices import resolve_device
    from fedattn.runtime.models import load_model
    from fedattn.systems.fedattn.schedule import check_layers

    if args.source == "gsm8k" and args.count > (questions := len(gsm8k.load("test"))):
        raise FedAttnError(f"--count {args.count} is more than the {questions} GSM8K test questions")
    codec = get_codec(args.kv_codec)
    torch_dtype = getattr(torch, args.dtype)
    loaded = load_model(args.model, device=resolve_device(args.device), dtype=torch_dtype)
    num_layers = loaded.model.config.num_hidden_layers
    with naming_option("--blocks"):
        blocks = check_layers(args.blocks, num_layers) if args.blocks is not None else default_blocks(num_layers)
    with ResultStore(args.out, _config(args, loaded, blocks)) as store:
        grid = [(block, sigma) for block in blocks for sigma in args.noise]
        todo = pending(store, grid, lambda point: _record_key(*point))
        costs: dict[str, float] = {}
        if todo:  # the victims' K/V and the attacks' tables only when something is left to attack
            setup = _setup(args, loaded, codec, blocks, costs)
            loose = LooseForm(loaded.tokenizer)

            def attack(points: list[tuple[int, float]]) -> list[dict]:
                return [attack_record(setup, block, sigma, args, loose) for block, sigma in points]

            run_batches(store, todo, attack, 1, "attacking (block, noise)", len(grid))
        costs["peak_rss_mb"] = peak_rss_mb()
        summary = summarize(store.records(), costs)
        store.write_summary(summary)
    plot_recovery(summary["rate"], store.directory / "recovery.png", f"{loaded.name} · K/V as {codec.name}")
    print_table(summary)
    print(f"results in {store.directory}")
    return 0


def attack_record(setup: AttackSetup, block: int, sigma: float, args: argparse.Namespace, loose: LooseForm) -> dict:
    """One (block, noise) point: the recovery rates, what the attack took, and a sample."""
    start = time.perf_counter()
    guessed, truth = attack_block(setup, block, sigma)
    seconds = time.perf_counter() - start
    return {
        "key": _record_key(block, sigma),
        "block": block,
        "noise": sigma,
        "method": "vocabulary-table" if block == 0 else method_name(args.keys, args.verify),
        "attack_s": seconds,
        **score(guessed, truth, loose),
        "sample": sample_text(setup.tokenizer, setup.victims[0], guessed),
    }


def method_name(keys: str, verify: int) -> str:
    probe = f"ridge-probe ({keys} keys)"
    return f"{probe} + verification of its top {verify}" if verify else probe


def summarize(records: list[dict], costs: dict) -> dict:
    """Recovery per block and noise (exact and loose), tokens attacked, and what the attack cost."""
    rate: dict[str, dict[str, float]] = {}
    loose: dict[str, dict[str, float]] = {}
    for record in sorted(records, key=lambda record: (record["block"], record["noise"])):
        rate.setdefault(str(record["block"]), {})[f"{record['noise']:g}"] = record["rate"]
        loose.setdefault(str(record["block"]), {})[f"{record['noise']:g}"] = record["loose_rate"]
    attack_s = sum(record["attack_s"] for record in records)
    return {
        "rate": rate,
        "loose_rate": loose,
        "tokens": records[0]["tokens"] if records else 0,
        "methods": {str(record["block"]): record["method"] for record in records},
        "cost": costs | {"attack_s": attack_s},
    }


def print_table(summary: dict, rows: str = "block", levels_name: str = "sigma") -> None:
    """The summary's recovery rates, one row per ``rows`` (the attacked block), one column per noise level."""
    from rich.console import Console
    from rich.table import Table

    levels = sorted({level for row in summary["rate"].values() for level in row}, key=float)
    table = Table(title=f"token recovery (exact; loose in brackets) over {summary['tokens']} private tokens")
    table.add_column(rows, justify="right")
    for level in levels:
        table.add_column(f"{levels_name} {level}", justify="right")
    for block, row in summary["rate"].items():
        cells = [
            f"{row[level]:.1%} ({summary['loose_rate'][block][level]:.1%})" if level in row else "" for level in levels
        ]
        table.add_row(block, *cells)
    Console().print(table)


def plot_recovery(rate: dict[str, dict[str, float]], out: Path, title: str) -> Drawn:
    """Recovery rate against the attacked block, one line per noise level."""
    from fedattn.evaluation.plots import new_figure, save_figure

    figure, axes = new_figure()
    levels = sorted({level for row in rate.values() for level in row}, key=float)
    for level in levels:
        points = sorted((int(block), row[level]) for block, row in rate.items() if level in row)
        axes.plot([block for block, _ in points], [value for _, value in points], marker="o", label=f"sigma {level}")
    axes.set_xlabel("sync block")
    axes.set_ylabel("tokens recovered (exact)")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.legend()
    return save_figure(figure, out)
