"""``fedattn attack-split``: how much of a client's prompt the hidden states it sends give away.

In split inference the client runs the embeddings and blocks [0, A) and sends h_A, the output of
block A - 1 for every prompt token (noised by ``privacy.noise.add_hidden_noise``, coded by the
hidden-state codec). This module knows only that: hidden states at a depth A, a noise setting and
a codec; not any system's frames. The attacker is the curious receiver, with the public weights
and tokenizer, told the noise's standard deviation (the level is agreed at the handshake; for a
relative level it is the level times the mean |h| of what was sent, which the receiver can
estimate closely from the received tensor itself). Two attacks:

* **Same-weights search.** Hidden states are causal, so left to right the attacker runs blocks
  [0, A) itself on candidate tokens behind the prefix it has recovered so far (its own KV cache,
  ``kv_attack.PrefixStep``) and keeps the candidate whose h_A is nearest the received vector (the
  maximum-likelihood choice under isotropic Gaussian noise). Scoring the whole vocabulary at every
  position is exact but costs |V| tokens of A blocks per position, so candidates are shortlisted
  by a ridge probe from h_A to the token's unit embedding, fitted on public text and made aware of
  the noise (``kv_attack.RidgeProbe.weights_under_noise``): ``--shortlist K`` scores its top K in
  one batched forward, ``--shortlist all`` the whole vocabulary. Each record gives the share of
  private tokens whose true token was on the shortlist (``shortlist_hit_rate``): an upper bound on
  what the search recovers behind a correct prefix, so the gap to ``all`` is what the shortlist costs.
  Template tokens are public and taken as known.
* **Learned inversion decoder** (the paper's attack). The server trains, on public text (GSM8K
  train questions, ``kv_attack.public_sequences``) passed through the same noise and codec, a
  decoder from received h_A to the tokens, with cross-entropy. The paper's decoder is a randomly
  initialised copy of the last A blocks, the final norm and the LM head. Training that on two
  CPU cores is out of reach for a 0.5B model, so here it is ``--decoder-blocks`` (default 1)
  freshly initialised blocks of the model's own shape and class, a fresh final norm, and the
  model's public LM head, frozen: the head is most of the parameters and is public anyway, one
  block gives the decoder the context of earlier (noisy) positions, and a single block is one
  A-th of the paper's at A = 5. Training is seeded (initialisation, order, noise draws are pure
  functions of the seed and step), checkpointed in the results folder and resumed from there.

Victims are ``fedattn attack``'s (``kv_attack.SOURCES``: CrossFacts collaborator documents or
GSM8K test questions, chat template included), each as a client's whole prompt from position 0
(a split client always sends its prompt from position 0). The score is ``fedattn attack``'s: the
share of private tokens recovered exactly (and loosely). Every record also gives the bytes the
victim sends per token (d values through the codec), to set beside FedAttn's K/V per block.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedattn.argtypes import positive_int
from fedattn.errors import FedAttnError
from fedattn.network.kv_codec import KVCodec
from fedattn.privacy.kv_attack import (
    SOURCES,
    TRAIN_SEQUENCE,
    LooseForm,
    PrefixStep,
    RidgeProbe,
    Victim,
    add_common_arguments,
    noise_levels,
    peak_rss_mb,
    print_table,
    probe_candidates,
    public_sequences,
    sample_text,
    score,
    unit_rows,
)
from fedattn.privacy.noise import add_hidden_noise, hidden_noise_sigma
from fedattn.runtime.attention import federated_attention_enabled
from fedattn.runtime.blocks import RowStep, SplitModel
from fedattn.runtime.seeding import seeded_generator

ATTACKS = ("search", "decoder")
DEFAULT_CLIENT_BLOCKS = (1, 2, 3, 5)
DEFAULT_LEVELS = (0.0, 0.02, 0.1, 0.5)
DEFAULT_SHORTLIST = 64
DEFAULT_TRAIN_TOKENS = 8000
DEFAULT_DECODER_BLOCKS = 1
DEFAULT_DECODER_EPOCHS = 2
DECODER_LEARNING_RATE = 1e-3
HELD_OUT_SHARE = 0.1  # of the public sequences, kept out of the decoder's training to measure it
CHECKPOINT_EVERY = 8  # decoder steps (one public sequence each) between checkpoints
CANDIDATE_CHUNK = 512  # candidate tokens run through the blocks at once
HEAD_CHUNK = 512  # positions whose vocabulary logits are formed at once
SUMMARY_RATES = ("rate", "loose_rate", "shortlist_hit_rate", "probe_top1_rate")  # tables by attack, A and noise


@dataclass(frozen=True)
class HiddenNoise:
    """``add_hidden_noise``'s setting: mean absolute ``level``, or ``level`` times the tensor's mean |h|."""

    level: float
    relative: bool

    @property
    def key(self) -> str:
        return f"{self.level:g}{' relative' if self.relative else ''}"

    def sigma(self, hidden: torch.Tensor) -> float:
        """The standard deviation of the noise on ``hidden`` (what the attacker is told)."""
        return hidden_noise_sigma(hidden, self.level, self.relative)


# -- what the client sends and the server receives ------------------------------------------------
def hidden_states(split: SplitModel, token_ids: Sequence[int], depths: Sequence[int]) -> dict[int, torch.Tensor]:
    """h_A for every A in ``depths``: the output of blocks [0, A) over ``token_ids`` at positions
    0, 1, ... (a split client's prefill), computed once up to the deepest A."""
    positions = torch.arange(len(token_ids))
    store = split.new_store()
    hidden, done, states = split.embed(list(token_ids)), 0, {}
    for depth in sorted(set(depths)):
        (hidden,) = split.run([RowStep(hidden, positions, store, done, depth)])
        states[depth], done = hidden, depth
    return states


def received(hidden: torch.Tensor, noise: HiddenNoise, codec: KVCodec, generator: torch.Generator) -> torch.Tensor:
    """(T, d) float32: what the receiver decodes, the sender's noise then the codec there and back."""
    noisy = add_hidden_noise(hidden, noise.level, noise.relative, generator)
    payload = codec.encode_tensor(noisy)
    return codec.decode_tensor(memoryview(payload), *hidden.shape).float()


# -- the same-weights search ------------------------------------------------------------------------
def fit_probe(split: SplitModel, sequences: list[torch.Tensor], token_ids: list[list[int]]) -> RidgeProbe:
    """The ridge map from clean h_A of public text to the unit embeddings of its tokens. Each
    sequence's first position is left out: it attends to itself alone and its hidden state takes
    the outlying scale of an attention sink, which would dominate the fit."""
    embeddings = split.decoder.embed_tokens.weight.detach()
    targets = unit_rows(embeddings[torch.tensor([token for ids in token_ids for token in ids[1:]])])
    return RidgeProbe.fit(torch.cat([hidden[1:].float() for hidden in sequences]), targets)


def shortlisted(
    split: SplitModel, probe: RidgeProbe, sent: torch.Tensor, sigma: float, vocabulary: int, size: int
) -> torch.Tensor:
    """(T, size) candidate ids per position, by the noise-aware probe, best first."""
    embeddings = split.decoder.embed_tokens.weight.detach()[:vocabulary]
    return probe_candidates(probe, probe.weights_under_noise(sigma**2), embeddings, sent, size)


def _candidates_forward(split: SplitModel, step: PrefixStep, tokens: list[int], position: int, depth: int):
    """(n, d) h_A of each of ``tokens`` at ``position`` behind the prefix ``step`` holds."""
    hidden = split.embed(tokens).unsqueeze(1)
    positions = torch.full((len(tokens), 1), position, device=split.device)
    for block in range(depth):
        hidden = split.block(block, hidden, positions, step)
    return hidden[:, 0].float()


@torch.inference_mode()
def search_segment(
    split: SplitModel,
    depth: int,
    victim: Victim,
    sent: torch.Tensor,
    candidates: torch.Tensor | None,
    vocabulary: int,
    advance: Callable[..., None] = lambda count=1: None,
) -> torch.Tensor:
    """Left to right, the candidate whose h_A behind the recovered prefix is nearest ``sent``
    (candidates: one row per position, or None for the whole vocabulary), ``advance`` called after
    each position. Returns the guesses of the private tokens."""
    step = PrefixStep(depth, len(victim.token_ids))  # the pass ends before block ``depth``: never stopped
    whole = list(range(vocabulary))
    chosen = []
    with federated_attention_enabled(split.model):
        for position, (token, private) in enumerate(zip(victim.token_ids, victim.private)):
            options = (whole if candidates is None else candidates[position].tolist()) if private else [token]
            best, best_distance, chunks = 0, math.inf, range(0, len(options), CANDIDATE_CHUNK)
            for start in chunks:
                chunk = options[start : start + CANDIDATE_CHUNK]
                computed = _candidates_forward(split, step, chunk, position, depth)
                distances = (computed - sent[position]).pow(2).sum(dim=1)
                nearest = int(distances.argmin())
                if float(distances[nearest]) < best_distance:
                    best, best_distance = start + nearest, float(distances[nearest])
            if len(chunks) > 1:  # the chosen token's K/V were overwritten by later chunks: run it again
                _candidates_forward(split, step, [options[best]], position, depth)
                step.keep(0)
            else:
                step.keep(best)
            if private:
                chosen.append(options[best])
            advance()
    return torch.tensor(chosen, dtype=torch.long)


# -- the learned inversion decoder --------------------------------------------------------------------
class InversionDecoder(torch.nn.Module):
    """Fresh blocks of the model's shape and class and a fresh final norm, then the model's public
    LM head (frozen, not part of the state): received h_A (T, d) -> logits of the token at each position."""

    def __init__(self, split: SplitModel, blocks: int, seed: int) -> None:
        super().__init__()
        config = copy.deepcopy(split.model.config)
        config._attn_implementation = "sdpa"  # plain causal attention: no hook, no cache
        layer_class, norm_class = type(split.decoder.layers[0]), type(split.decoder.norm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.blocks = torch.nn.ModuleList(layer_class(config, index) for index in range(blocks))
            self.norm = norm_class(config.hidden_size, eps=config.rms_norm_eps)
        self.float()
        self._public = (split.decoder.rotary_emb, split.model.lm_head.weight.detach())  # not parameters

    def hidden(self, sent: torch.Tensor) -> torch.Tensor:
        """(T, d) normed outputs of the decoder's blocks over one received sequence."""
        hidden = sent.float().unsqueeze(0)
        positions = torch.arange(sent.shape[0]).unsqueeze(0)
        rotary, _ = self._public
        embeddings = tuple(part.float() for part in rotary(hidden, positions))
        for layer in self.blocks:
            output = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            hidden = output[0] if isinstance(output, tuple) else output
        return self.norm(hidden)[0]

    def loss(self, sent: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the tokens under the frozen head, formed ``HEAD_CHUNK`` positions at a time."""
        head = self._public[1].float()
        hidden = self.hidden(sent)
        total = hidden.new_zeros(())
        for start in range(0, len(token_ids), HEAD_CHUNK):
            logits = hidden[start : start + HEAD_CHUNK] @ head.T
            total = total + F.cross_entropy(logits, token_ids[start : start + HEAD_CHUNK], reduction="sum")
        return total / len(token_ids)

    @torch.inference_mode()
    def guess(self, sent: torch.Tensor, vocabulary: int) -> torch.Tensor:
        """(T,) the likeliest token at each position (among the tokenizer's ``vocabulary``)."""
        head = self._public[1][:vocabulary].float()
        hidden = self.hidden(sent)
        return torch.cat([(rows @ head.T).argmax(dim=1) for rows in hidden.split(HEAD_CHUNK)])


@dataclass(frozen=True)
class TrainingPlan:
    """What a decoder is trained on and how long; a checkpoint is resumed only for the same plan."""

    depth: int
    noise: HiddenNoise
    blocks: int
    steps: int
    seed: int
    codec: str
    train_tokens: int

    def identity(self) -> dict:
        return {
            "depth": self.depth,
            "noise": self.noise.level,
            "relative": self.noise.relative,
            "blocks": self.blocks,
            "seed": self.seed,
            "codec": self.codec,
            "train_tokens": self.train_tokens,
        }


def held_out_loss(decoder: InversionDecoder, pairs: list[tuple[torch.Tensor, torch.Tensor]], noise, codec, seed):
    """Mean cross-entropy over held-out public sequences, each under a fixed noise draw."""
    with torch.no_grad():
        losses = [
            float(decoder.loss(received(hidden, noise, codec, seeded_generator("held-out", seed, index)), ids))
            for index, (hidden, ids) in enumerate(pairs)
        ]
    return sum(losses) / len(losses)


def train_decoder(
    decoder: InversionDecoder,
    plan: TrainingPlan,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    codec: KVCodec,
    checkpoint: Path,
    advance: Callable[..., None] = lambda count=1: None,
) -> int:
    """Train until ``plan.steps`` steps (one public sequence each, in a seeded order per epoch,
    fresh noise draws that are a function of the step), resuming from ``checkpoint`` when it holds
    the same plan, saving it every ``CHECKPOINT_EVERY`` steps and at the end. Returns the steps
    this call ran."""
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=DECODER_LEARNING_RATE)
    done = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["plan"] != plan.identity():
            raise FedAttnError(f"{checkpoint} was trained for another setting; delete it to retrain")
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        done = min(int(state["step"]), plan.steps)
        advance(done)
    for step in range(done, plan.steps):
        epoch, place = divmod(step, len(pairs))
        order = random.Random(f"decoder-order:{plan.seed}:{epoch}").sample(range(len(pairs)), len(pairs))
        hidden, ids = pairs[order[place]]
        generator = seeded_generator("decoder-noise", plan.seed, plan.depth, plan.noise.key, step)
        loss = decoder.loss(received(hidden, plan.noise, codec, generator), ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == plan.steps:
            _save(checkpoint, {"plan": plan.identity(), "step": step + 1, **_states(decoder, optimizer)})
        advance()
    return plan.steps - done


def _states(decoder: InversionDecoder, optimizer: torch.optim.Optimizer) -> dict:
    return {"decoder": decoder.state_dict(), "optimizer": optimizer.state_dict()}


def _save(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: a run killed while saving keeps the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


# -- the experiment -------------------------------------------------------------------------------
@dataclass
class SplitAttackSetup:
    """Everything fixed before the (A, noise, attack) grid."""

    split: SplitModel
    tokenizer: object
    codec: KVCodec
    victims: list[Victim]
    sent: list[dict[int, torch.Tensor]]  # each victim's clean h_A by A
    public: list[tuple[list[int], dict[int, torch.Tensor]]]  # public sequences: ids, clean h_A by A
    probes: dict[int, RidgeProbe]
    vocabulary: int
    seed: int
    out: Path


def victims_from_zero(victims: list[Victim]) -> list[Victim]:
    """Each victim segment as a client's whole prompt: the same tokens, from position 0."""
    return [Victim(victim.token_ids, 0, victim.private) for victim in victims]


def record_key(depth: int, noise: HiddenNoise, attack: str) -> str:
    return f"A={depth} noise={noise.key} attack={attack}"


def private_truth(victims: list[Victim]) -> torch.Tensor:
    return torch.tensor([t for victim in victims for t, private in zip(victim.token_ids, victim.private) if private])


def victim_received(setup: SplitAttackSetup, depth: int, noise: HiddenNoise) -> list[tuple[torch.Tensor, float]]:
    """Each victim's received h_A and the noise's standard deviation on it."""
    generator = seeded_generator("split-attack", setup.seed, depth, noise.key)
    return [(received(sent[depth], noise, setup.codec, generator), noise.sigma(sent[depth])) for sent in setup.sent]


def attack_search(setup: SplitAttackSetup, depth: int, noise: HiddenNoise, size: int | None) -> tuple:
    """(guesses of the victims' private tokens, details); ``size`` None scores every token.

    One probe map serves every victim (noise-aware at the root-mean-square of their noise spreads),
    so the vocabulary is projected once per point. The details give the share of private tokens on
    the shortlist and the share the probe's first choice alone names (the probe read as an attack
    of its own: under heavy noise its ranking, fitted on real text, can beat the nearest-h_A choice)."""
    from fedattn.report.render import progress_bar

    sent = victim_received(setup, depth, noise)
    lengths = [len(victim.token_ids) for victim in setup.victims]
    candidates: list[torch.Tensor | None] = [None] * len(sent)
    details: dict = {"shortlist": "all" if size is None else size}
    if size is not None:
        sigma = math.sqrt(sum(spread**2 for _, spread in sent) / len(sent))
        rows = torch.cat([received for received, _ in sent])
        listed = shortlisted(setup.split, setup.probes[depth], rows, sigma, setup.vocabulary, size)
        private = torch.tensor([flag for victim in setup.victims for flag in victim.private])
        matches = listed[private] == private_truth(setup.victims).unsqueeze(1)
        details["shortlist_hit_rate"] = float(matches.any(dim=1).float().mean())
        details["probe_top1_rate"] = float(matches[:, 0].float().mean())
        candidates = list(listed.split(lengths))
    guesses = []
    with progress_bar(f"search A={depth} noise {noise.key}", sum(lengths)) as advance:
        for victim, (received, _), listed in zip(setup.victims, sent, candidates):
            guesses.append(search_segment(setup.split, depth, victim, received, listed, setup.vocabulary, advance))
    return torch.cat(guesses), details


def decoder_pairs(setup: SplitAttackSetup, depth: int) -> tuple[list, list]:
    """(training, held-out) public (clean h_A, ids) pairs: the last ``HELD_OUT_SHARE`` held out."""
    pairs = [(states[depth], torch.tensor(ids)) for ids, states in setup.public]
    held = max(1, round(len(pairs) * HELD_OUT_SHARE)) if len(pairs) > 1 else 0
    return pairs[: len(pairs) - held], pairs[len(pairs) - held :] or pairs


def attack_decoder(setup: SplitAttackSetup, depth: int, noise: HiddenNoise, args: argparse.Namespace) -> tuple:
    """(guesses, losses): the decoder trained (or resumed) for (A, noise), then run on the victims;
    its checkpoint is removed once the point is done (its record is what a resumed run needs)."""
    from fedattn.report.render import progress_bar

    training, held_out = decoder_pairs(setup, depth)
    plan = TrainingPlan(
        depth,
        noise,
        args.decoder_blocks,
        args.decoder_epochs * len(training),
        args.seed,
        args.hidden_codec,
        args.train_tokens,
    )
    decoder = InversionDecoder(setup.split, args.decoder_blocks, args.seed)
    before = held_out_loss(decoder, held_out, noise, setup.codec, args.seed)
    checkpoint = setup.out / "decoders" / f"A{depth}-noise{noise.key.replace(' ', '-')}.pt"
    with progress_bar(f"decoder A={depth} noise {noise.key}", plan.steps) as advance:
        train_decoder(decoder, plan, training, setup.codec, checkpoint, advance)
    after = held_out_loss(decoder, held_out, noise, setup.codec, args.seed)
    guesses = []
    for victim, (sent, _) in zip(setup.victims, victim_received(setup, depth, noise)):
        guesses.append(decoder.guess(sent, setup.vocabulary)[torch.tensor(victim.private)])
    checkpoint.unlink()  # the point is done; a 0.5B model's decoder and optimizer state are ~180 MB
    return torch.cat(guesses), {"held_out_loss_initial": before, "held_out_loss_trained": after, "steps": plan.steps}


def attack_record(
    setup: SplitAttackSetup, depth: int, noise: HiddenNoise, attack: str, args: argparse.Namespace, loose: LooseForm
) -> dict:
    """One (A, noise, attack) point: recovery, what the attack took, bytes sent per token, a sample."""
    start = time.perf_counter()
    truth = private_truth(setup.victims)
    if attack == "search":
        size = None if args.shortlist == "all" else args.shortlist
        guessed, details = attack_search(setup, depth, noise, size)
        positions = sum(len(victim.token_ids) for victim in setup.victims)
    else:
        guessed, details = attack_decoder(setup, depth, noise, args)
        positions = 0
    seconds = time.perf_counter() - start
    sigmas = [sigma for _, sigma in victim_received(setup, depth, noise)] if noise.level else [0.0]
    width = setup.split.hidden_size
    return {
        "key": record_key(depth, noise, attack),
        "client_blocks": depth,
        "noise": noise.level,
        "relative": noise.relative,
        "noise_sigma_mean": sum(sigmas) / len(sigmas),
        "attack": attack,
        "attack_s": seconds,
        "seconds_per_position": seconds / positions if positions else None,
        "bytes_per_token": setup.codec.tensor_size(1, width),
        **details,
        **score(guessed, truth, loose),
        "sample": sample_text(setup.tokenizer, setup.victims[0], guessed),
    }


def summarize(records: list[dict], costs: dict, codec: KVCodec, width: int) -> dict:
    """Recovery by attack, A and noise (exact, loose; the search's shortlist hits and its probe's
    first choices), bytes per token sent, what the attacks cost."""
    tables: dict[str, dict[str, dict[str, float]]] = {name: {} for name in SUMMARY_RATES}
    for record in sorted(records, key=lambda record: (record["attack"], record["client_blocks"], record["noise"])):
        row, level = f"{record['attack']} A={record['client_blocks']}", f"{record['noise']:g}"
        for name, table in tables.items():
            if name in record:
                table.setdefault(row, {})[level] = record[name]
    return {
        **tables,
        "tokens": records[0]["tokens"] if records else 0,
        "hidden_codec": codec.name,
        "bytes_per_token": codec.tensor_size(1, width),
        "cost": costs | {"attack_s": sum(record["attack_s"] for record in records)},
    }


# -- command line ---------------------------------------------------------------------------------
def depth_list(text: str) -> tuple[int, ...]:
    """'1,2,3,5' -> the client's block counts A (each >= 1), in order, without repeats."""
    values = [positive_int(part) for part in filter(None, (part.strip() for part in text.split(",")))]
    if not values:
        raise argparse.ArgumentTypeError("--client-blocks names no A")
    return tuple(dict.fromkeys(values))


def shortlist_size(text: str) -> int | str:
    """--shortlist K (K >= 1) or 'all' (the whole vocabulary: exact, |V| tokens per position)."""
    if text.strip().lower() == "all":
        return "all"
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a number of candidates K >= 1 or all, got {text!r}")
    return int(text)


def attack_names(text: str) -> tuple[str, ...]:
    if text == "both":
        return ATTACKS
    if text not in ATTACKS:
        raise argparse.ArgumentTypeError(f"must be search, decoder or both, got {text!r}")
    return (text,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fedattn.systems.fedsea.config import hidden_codec

    add_common_arguments(
        parser,
        "float32",
        "seed of the noise, the decoder's initialisation and order",
        "results folder: records.jsonl, summary.json, decoders/ (checkpoints); reruns resume",
    )
    parser.add_argument(
        "--client-blocks",
        type=depth_list,
        default=DEFAULT_CLIENT_BLOCKS,
        metavar="1,2,3,5",
        help="the depths A attacked: the client runs blocks [0, A) and sends their output (default 1,2,3,5)",
    )
    parser.add_argument(
        "--noise",
        type=noise_levels,
        default=DEFAULT_LEVELS,
        metavar="0,0.02,0.1",
        help="noise levels: mean |noise| on h_A, as fedattn split --noise (default 0,0.02,0.1,0.5)",
    )
    parser.add_argument(
        "--noise-relative",
        action="store_true",
        help="the levels are relative: times the mean |h_A| of what is sent (fedattn split --noise-relative)",
    )
    parser.add_argument("--attack", type=attack_names, default=ATTACKS, metavar="search|decoder|both")
    parser.add_argument(
        "--shortlist",
        type=shortlist_size,
        default=DEFAULT_SHORTLIST,
        metavar="K|all",
        help=f"search: candidates scored exactly per position, by the probe's ranking, or all (default "
        f"{DEFAULT_SHORTLIST})",
    )
    parser.add_argument(
        "--train-tokens",
        type=positive_int,
        default=DEFAULT_TRAIN_TOKENS,
        help=f"public-text tokens the probe and the decoder are trained on (default {DEFAULT_TRAIN_TOKENS})",
    )
    parser.add_argument(
        "--decoder-blocks",
        type=positive_int,
        default=DEFAULT_DECODER_BLOCKS,
        help=f"fresh blocks of the model's shape in the decoder (default {DEFAULT_DECODER_BLOCKS})",
    )
    parser.add_argument(
        "--decoder-epochs",
        type=positive_int,
        default=DEFAULT_DECODER_EPOCHS,
        help=f"passes of the decoder over its training text (default {DEFAULT_DECODER_EPOCHS})",
    )
    parser.add_argument(
        "--hidden-codec",
        type=hidden_codec,
        default="float32",
        metavar="CODEC",
        help="hidden states on the wire, as fedattn split --hidden-codec (default float32)",
    )


def _config(args: argparse.Namespace, loaded, depths: tuple[int, ...]) -> dict:
    return {
        "model": {"name": loaded.name, "identity": loaded.identity, "dtype": args.dtype},
        "client_blocks": list(depths),
        "noise": list(args.noise),
        "noise_relative": args.noise_relative,
        "attacks": list(args.attack),
        "shortlist": args.shortlist,
        "train_tokens": args.train_tokens,
        "decoder_blocks": args.decoder_blocks,
        "decoder_epochs": args.decoder_epochs,
        "hidden_codec": args.hidden_codec,
        "source": args.source,
        "count": args.count,
        "data_seed": args.data_seed,
        "seed": args.seed,
    }


def _setup(args: argparse.Namespace, loaded, split: SplitModel, codec: KVCodec, depths, out: Path, costs: dict):
    from fedattn.report.render import progress_bar

    tokenizer = loaded.tokenizer
    start = time.perf_counter()
    victims = victims_from_zero(SOURCES[args.source](tokenizer, args.count, args.data_seed))
    with progress_bar("victims' h_A", len(victims)) as advance:
        sent = []
        for victim in victims:
            sent.append(hidden_states(split, victim.token_ids, depths))
            advance()
    costs["victims_s"] = time.perf_counter() - start
    start = time.perf_counter()
    public = []
    sequences = public_sequences(tokenizer, args.train_tokens, args.seed)
    with progress_bar("public text's h_A", args.train_tokens) as advance:
        for sequence in sequences:
            public.append((sequence.token_ids, hidden_states(split, sequence.token_ids, depths)))
            advance(len(sequence.token_ids))
    probes = {}
    if "search" in args.attack and args.shortlist != "all":
        ids = [ids for ids, _ in public]
        probes = {depth: fit_probe(split, [states[depth] for _, states in public], ids) for depth in depths}
    costs["public_s"] = time.perf_counter() - start
    vocabulary = min(len(tokenizer), split.decoder.embed_tokens.num_embeddings)
    return SplitAttackSetup(split, tokenizer, codec, victims, sent, public, probes, vocabulary, args.seed, out)


def run(args: argparse.Namespace) -> int:
    """Attack every (A, noise, attack) point not yet in --out; one record each, then the summary."""
    from fedattn.evaluation.harness import pending, run_batches
    from fedattn.evaluation.results import ResultStore
    from fedattn.network.kv_codec import get_codec
    from fedattn.runtime.devices import resolve_device
    from fedattn.runtime.models import load_model

    if args.source == "gsm8k":
        from fedattn.evaluation.tasks import gsm8k

        if args.count > (questions := len(gsm8k.load("test"))):
            raise FedAttnError(f"--count {args.count} is more than the {questions} GSM8K test questions")
    if args.train_tokens < 2 * TRAIN_SEQUENCE and "decoder" in args.attack:
        raise FedAttnError(
            f"--train-tokens must be at least {2 * TRAIN_SEQUENCE} for the decoder (one sequence is held out)"
        )
    codec = get_codec(args.hidden_codec)
    loaded = load_model(args.model, device=resolve_device(args.device), dtype=getattr(torch, args.dtype))
    split = SplitModel(loaded.model)
    if max(args.client_blocks) >= split.num_blocks:
        raise FedAttnError(
            f"--client-blocks {max(args.client_blocks)}: the model has {split.num_blocks} blocks (A must be below it)"
        )
    depths = args.client_blocks
    with ResultStore(args.out, _config(args, loaded, depths)) as store:
        levels = [HiddenNoise(level, args.noise_relative) for level in args.noise]
        grid = [(depth, noise, attack) for attack in args.attack for depth in depths for noise in levels]
        todo = pending(store, grid, lambda point: record_key(*point))
        costs: dict[str, float] = {}
        if todo:
            setup = _setup(args, loaded, split, codec, depths, store.directory, costs)
            loose = LooseForm(loaded.tokenizer)

            def attack(points: list) -> list[dict]:
                return [attack_record(setup, *point, args, loose) for point in points]

            run_batches(store, todo, attack, 1, "attacking (A, noise, attack)", len(grid))
        costs["peak_rss_mb"] = peak_rss_mb()
        summary = summarize(store.records(), costs, codec, split.hidden_size)
        store.write_summary(summary)
    print_table(summary, "attack, A", "noise")
    print(f"{summary['bytes_per_token']} bytes per token sent ({args.hidden_codec}); results in {store.directory}")
    return 0
