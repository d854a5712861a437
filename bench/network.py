"""Networked FedAttn over emulated links: one network namespace per party, shaped veth pairs.

Qwen2.5-Coder-0.5B-Instruct (default), N = 4, the 4-shot GSM8K prompt cut TokEx-style (the
exemplars in N - 1 equal token ranges, one per collaborator; the publisher holds the question),
``--raw`` (no chat template), greedy, ``--max-new-tokens 32``.

Topology (root only; everything is created by this script and removed at the end, also on error
or Ctrl-C): a switch namespace ``fa-sw`` with a bridge ``fa-br`` (10.203.0.254/24), and per party
R a namespace ``fa-pR`` whose veth ``fa-vR`` (10.203.0.R+1/24) is paired with ``fa-sR`` on the
bridge. No host interface and no other address is touched. Each party is
``ip netns exec fa-pR python -m fedattn.cli participant ...`` with ``GLOO_SOCKET_IFNAME=fa-vR``
and ``OMP_NUM_THREADS=1``. The rendezvous store is served by a small helper in the switch
namespace (as the local launcher serves it), so no party's death takes it down and no party's
link is favoured by hosting it.

Link profiles shape both ends of every party's veth (its uplink and its downlink): rate with
``tbf``; delay with ``netem`` (half the profile's one-way party-to-party delay on each hop) when the
kernel has it. Where it does not, the output says so and the delay is 0.

``--transports torch,grpc`` runs every query over gloo and over gRPC with mutual TLS (a throwaway
federation whose parties listen on their own namespace's address, ``participant --roster``; no
store), one after the other, so the two meet the same link.

Per profile (unshaped, 100 Mbit/s, 20 Mbit/s) and schedule (H = 1, 2, 4, 8, publisher-dense):
TTFT, total time, bytes on the links, the answer; against the in-process engine
(``fedattn run --raw``, same schedule) and the publisher alone (no collaborators), each at 1 thread
(as one party) and at all cores (what the party processes share). One run per cell: these are
single samples, not medians.

TTFT, networked: the publisher's ``wall_s - decode_s`` (from the start of its run, once every party
has joined and the gloo group is up, hello handshake included, to its first token; its
``prefill_s``, from the end of its handshake, is in the JSON too). In-process and alone:
``timing.prefill_s``. Total: the publisher's ``wall_s`` (model load and join excluded).

``--system split``: FedSEA split inference instead (``fedattn split-party``: the server in ``fa-p0``,
the client in ``fa-p1``, ``--client-blocks A,C``, default 2,2) with the publisher's whole prompt as
the client's prompt, beside centralized inference (``fedattn run`` with that prompt and no other
party: the whole model in one process, host namespace) and FedAttn's ``retrieval`` schedule (N
parties, the prompt cut as above), on every profile: TTFT, per-token latency (decode_s over the
tokens after the first), total, bytes on the links. Medians of ``--repeats`` runs (default 3; 1 with
``--quick``, which also runs the centralized baseline at 1 thread only).

    sudo .venv/bin/python bench/network.py --out network.json          # full, ~7 min on 2 cores
    sudo .venv/bin/python bench/network.py --quick --out network.json  # 100 Mbit/s, H = 1 and dense, ~2 min
    sudo .venv/bin/python bench/network.py --system split --quick --out split-network.json  # ~4 min, 0.5B

Exit 0 with one line ``skipped: ...`` where namespaces are not allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.203.0"
SWITCH_NS, BRIDGE, SWITCH_IP = "fa-sw", "fa-br", f"{SUBNET}.254"
STORE_PORT_BASE = 29400
GRPC_PORT = 50051  # every party's service, on its own namespace's address
TRANSPORT_LABELS = {"torch": "gloo (plain TCP)", "grpc": "gRPC with mutual TLS"}
PROBE_PORT = 5201
TBF_BURST, TBF_LATENCY = "64kb", "400ms"
LOCK_PATH = Path("/run/lock/fa-netbench.lock")
PARTY_TIMEOUT_S = 120
RUN_LIMIT_S = 420  # one networked run, model loads included

_children: list[subprocess.Popen] = []  # every process this script started, for the cleanup


def party_ns(rank: int) -> str:
    return f"fa-p{rank}"


def party_if(rank: int) -> str:
    return f"fa-v{rank}"


def switch_if(rank: int) -> str:
    return f"fa-s{rank}"


def party_ip(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


@dataclass(frozen=True)
class Profile:
    name: str
    label: str
    rate_mbit: int | None  # None: the veth as is
    delay_ms: float  # one-way party-to-party delay asked for


PROFILES = [
    Profile("unshaped", "unshaped veth", None, 0.0),
    Profile("100mbit", "100 Mbit/s", 100, 5.0),
    Profile("20mbit", "20 Mbit/s", 20, 20.0),
]
SCHEDULES = [
    ("H=1", ["--sync-every", "1"]),
    ("H=2", ["--sync-every", "2"]),
    ("H=4", ["--sync-every", "4"]),
    ("H=8", ["--sync-every", "8"]),
    ("publisher-dense", ["--schedule", "publisher-dense"]),
]


class Skip(Exception):
    """This machine cannot run the bench (not an error of the bench)."""


class SetupError(Exception):
    pass


def sh(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}").splitlines()[0]
        raise SetupError(f"{' '.join(command)}: {message}")
    return done


def _die_with_parent() -> None:
    """In the child before exec (``ip netns exec`` execs the target, which keeps this): SIGKILL
    it when this script goes away."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(command: list[str], **kwargs) -> subprocess.Popen:
    child = subprocess.Popen(command, preexec_fn=_die_with_parent, cwd=REPO, **kwargs)
    _children.append(child)
    return child


def stop(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=10)
    if child in _children:
        _children.remove(child)


# -- topology -----------------------------------------------------------------------------------


class Topology:
    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.created: list[str] = []
        self.netem_error: str | None = None

    @staticmethod
    def stale() -> list[str]:
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        names = [line.split()[0] for line in listed if line.strip()]
        return [name for name in names if name == SWITCH_NS or (name.startswith("fa-p") and name[4:].isdigit())]

    def setup(self) -> None:
        for name in self.stale():
            sh("ip", "netns", "del", name, check=False)
        first = sh("ip", "netns", "add", SWITCH_NS, check=False)
        if first.returncode != 0:
            reason = (first.stderr.strip() or f"exit code {first.returncode}").splitlines()[0]
            if "exists" in reason:
                raise SetupError(f"ip netns add {SWITCH_NS}: {reason} (a stale namespace could not be removed)")
            raise Skip(f"network namespaces are not allowed here (ip netns add {SWITCH_NS}: {reason})")
        self.created.append(SWITCH_NS)
        sh("ip", "-n", SWITCH_NS, "link", "set", "lo", "up")
        sh("ip", "-n", SWITCH_NS, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        sh("ip", "-n", SWITCH_NS, "addr", "add", f"{SWITCH_IP}/24", "dev", BRIDGE)
        sh("ip", "-n", SWITCH_NS, "link", "set", BRIDGE, "up")
        for rank in range(self.parties):
            ns = party_ns(rank)
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh(
                "ip",
                "link",
                "add",
                party_if(rank),
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                switch_if(rank),
                "netns",
                SWITCH_NS,
            )
            sh("ip", "-n", SWITCH_NS, "link", "set", switch_if(rank), "master", BRIDGE)
            sh("ip", "-n", SWITCH_NS, "link", "set", switch_if(rank), "up")
            sh("ip", "-n", ns, "addr", "add", f"{party_ip(rank)}/24", "dev", party_if(rank))
            sh("ip", "-n", ns, "link", "set", party_if(rank), "up")
        probe = sh("tc", "-n", SWITCH_NS, "qdisc", "add", "dev", BRIDGE, "root", "netem", "delay", "1ms", check=False)
        if probe.returncode == 0:
            sh("tc", "-n", SWITCH_NS, "qdisc", "del", "dev", BRIDGE, "root", check=False)
        else:
            self.netem_error = (probe.stderr.strip() or f"exit code {probe.returncode}").splitlines()[0]

    def ends(self) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of every party's veth: uplink and downlink."""
        return [(party_ns(r), party_if(r)) for r in range(self.parties)] + [
            (SWITCH_NS, switch_if(r)) for r in range(self.parties)
        ]

    def shape(self, profile: Profile) -> dict:
        """Apply ``profile`` on every veth end; returns what was really applied."""
        delay_per_hop = profile.delay_ms / 2 if self.netem_error is None else 0.0
        for ns, dev in self.ends():
            sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if profile.rate_mbit is None and delay_per_hop == 0:
                continue
            tbf = ["tbf", "rate", f"{profile.rate_mbit}mbit", "burst", TBF_BURST, "latency", TBF_LATENCY]
            if delay_per_hop > 0:
                sh(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "handle",
                    "1:",
                    "netem",
                    "delay",
                    f"{delay_per_hop}ms",
                    "limit",
                    "100000",
                )
                if profile.rate_mbit is not None:
                    sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf)
            else:
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf)
        qdisc = sh("tc", "-n", party_ns(0), "qdisc", "show", "dev", party_if(0)).stdout.strip()
        return {
            "rate_mbit": profile.rate_mbit,
            "delay_ms_asked": profile.delay_ms,
            "delay_ms_emulated": delay_per_hop * 2,
            "qdisc_on_each_veth_end": qdisc,
        }

    def tx_bytes(self, world: int) -> list[int]:
        """Bytes each of the first ``world`` parties put on its veth (frames, headers, ACKs, store traffic)."""
        counts = []
        for rank in range(world):
            shown = json.loads(sh("ip", "-n", party_ns(rank), "-j", "-s", "link", "show", party_if(rank)).stdout)
            counts.append(int(shown[0]["stats64"]["tx"]["bytes"]))
        return counts

    def teardown(self) -> list[str]:
        problems = []
        for name in reversed(self.created):
            done = sh("ip", "netns", "del", name, check=False)
            if done.returncode != 0:
                problems.append(f"ip netns del {name}: {done.stderr.strip()}")
        self.created.clear()
        left = self.stale()
        if left:
            problems.append(f"namespaces left: {left}")
        return problems


# -- helpers run inside a namespace (hidden modes of this file) ---------------------------------


def serve_store(port: int, world_size: int) -> None:
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(
        SWITCH_IP,
        port,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=PARTY_TIMEOUT_S),
    )
    print("ready", flush=True)
    sys.stdin.read()  # until the bench closes our stdin (or we die with it)
    del store


def probe_server(host: str, port: int) -> None:
    listener = socket.create_server((host, port))
    print("ready", flush=True)
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = connection.makefile("rb")
    while (byte := reader.read(1)) == b"p":
        connection.sendall(b"p")
    (length,) = struct.unpack("!Q", byte + reader.read(7))
    remaining = length
    while remaining:
        remaining -= len(reader.read1(min(remaining, 1 << 20)))
    connection.sendall(b"k")


def probe_client(host: str, port: int, length: int) -> None:
    connection = socket.create_connection((host, port), timeout=60)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(20):
        start = time.perf_counter()
        connection.sendall(b"p")
        connection.recv(1)
        rtts.append(time.perf_counter() - start)
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    connection.sendall(struct.pack("!Q", length))
    remaining = length
    while remaining:
        sent = min(remaining, len(chunk))
        connection.sendall(chunk[:sent])
        remaining -= sent
    connection.recv(1)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rtt_ms": statistics.median(rtts) * 1000,
                "mbit_s": length * 8 / seconds / 1e6,
                "bytes": length,
                "seconds": seconds,
            }
        )
    )


# -- the bench ----------------------------------------------------------------------------------


def in_ns(ns: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *command]


def wait_ready(child: subprocess.Popen, what: str) -> None:
    line = child.stdout.readline()
    if line.strip() != "ready":
        stop(child)
        raise SetupError(f"{what} did not start: {line.strip() or 'no output'}")


def probe(profile: Profile, parties: int) -> dict:
    """RTT and bulk throughput from party 0 to the publisher, across the switch (two shaped hops)."""
    length = 200_000_000 if profile.rate_mbit is None else int(profile.rate_mbit * 1e6 / 8 * 2)
    last = parties - 1
    server = spawn(
        in_ns(party_ns(last), sys.executable, __file__, "--_probe-server", party_ip(last), str(PROBE_PORT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(server, "the probe server")
        client = subprocess.run(
            in_ns(
                party_ns(0), sys.executable, __file__, "--_probe-client", party_ip(last), str(PROBE_PORT), str(length)
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if client.returncode != 0:
            return {"error": (client.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(client.stdout)
    finally:
        stop(server)


def prompt_texts(model: str, parties: int, shots: int, item: int) -> tuple[list[str], str, dict]:
    """The collaborators' texts (exemplar token ranges decoded) and the question; checks the
    tokens each party will get against ``tokex_segments``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefill_decode import tokex_segments
    from transformers import AutoTokenizer

    from fedattn.evaluation.tasks import gsm8k
    from fedattn.runtime.models import KNOWN_MODELS, ensure_cache
    from fedattn.runtime.prompting import build_segments
    from fedattn.runtime.tiny_model import TINY_MODELS, tiny_tokenizer

    if model in TINY_MODELS:  # built in code, nothing on disk
        tokenizer = tiny_tokenizer(TINY_MODELS[model])
    else:
        directory = ensure_cache(KNOWN_MODELS[model], progress=False) if model in KNOWN_MODELS else Path(model)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = gsm8k.few_shot_prompt(item, shots)
    exemplars = gsm8k.SEPARATOR.join(prompt.exemplars)
    ids = tokenizer(exemplars, add_special_tokens=False).input_ids
    cuts = [round(i * len(ids) / (parties - 1)) for i in range(parties)]
    contexts = [tokenizer.decode(ids[cuts[i] : cuts[i + 1]]) for i in range(parties - 1)]
    question = prompt.question
    segments = build_segments(tokenizer, contexts, question, raw=True)  # what --raw parties will tokenize
    reference = tokex_segments(tokenizer, parties, shots, item)
    info = {
        "segment_tokens": [len(s) for s in segments],
        "total_tokens": sum(len(s) for s in segments),
        "same_ids_as_tokex_segments": segments == reference,
        # the publisher's whole prompt as one party's text (--system split: the client's and the centralized run's)
        "whole_prompt_tokens": len(build_segments(tokenizer, [], "".join(contexts) + question, raw=True)[0]),
        "exemplars_rejoin_exactly": "".join(contexts) == exemplars,
        "gsm8k_item": item,
        "shots": shots,
    }
    return contexts, question, info


def write_private(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.touch(mode=0o600)
    path.write_text(text, encoding="utf-8")
    return f"@{path}"


def common_env(threads: int) -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )


def cli_document(words: list[str], threads: int) -> dict:
    """``fedattn WORDS --json`` in this (host) namespace, no network: its JSON document, or ``error``."""
    command = [sys.executable, "-m", "fedattn.cli", *words, "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=common_env(threads), cwd=REPO, timeout=RUN_LIMIT_S
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout)


def per_token_s(decode_s: float, token_ids: list[int]) -> float:
    """Mean seconds per token after the first (the first comes with the prefill), as the split client counts."""
    return decode_s / (len(token_ids) - 1) if len(token_ids) > 1 else 0.0


def run_cli(words: list[str], threads: int) -> dict:
    """``fedattn run`` in this (host) namespace, no network: a baseline."""
    document = cli_document(["run", *words], threads)
    if "error" in document:
        return document
    timing = document["timing"]
    return {
        "ttft_s": timing["prefill_s"],
        "prefill_s": timing["prefill_s"],
        "decode_s": timing["decode_s"],
        "per_token_s": per_token_s(timing["decode_s"], document["answer_token_ids"]),
        "total_s": timing["wall_s"],
        "answer": document["answer"],
        "answer_token_ids": document["answer_token_ids"],
        "sync_layers": document["sync_layers"],
        "measured_bytes_sent": document["measured_bytes"]["sent"],
    }


def federation(folder: Path, names: list[str]) -> Path:
    """A throwaway federation of ``names`` (rank order; the last may start queries) whose parties
    listen on their own namespace's address (gRPC runs)."""
    from fedattn.network.federation import init_federation

    addresses = [f"{party_ip(rank)}:{GRPC_PORT}" for rank in range(len(names))]
    where = folder / f"federation-{'-'.join(names)}"
    return init_federation(where, names, addresses, names[-1:]).folder / "roster.toml"


def rendezvous_words(transport: str, rank: int, names: list[str], port: int, roster: Path | None) -> list[str]:
    if transport == "grpc":
        return ["--roster", str(roster), "--name", names[rank]]
    world = len(names)
    return ["--rank", str(rank), "--world-size", str(world), "--master", f"{SWITCH_IP}:{port}", "--external-store"]


def party_names_of(world: int) -> list[str]:
    from fedattn.systems.fedattn.party import party_names

    return party_names(world)


def run_networked(
    topo: Topology,
    own: list[list[str]],
    shared: list[str],
    port: int,
    folder: Path,
    transport: str = "torch",
    roster: Path | None = None,
) -> dict:
    """One FedAttn query: one participant per party namespace (``launch_in_namespaces``)."""
    launched = launch_in_namespaces(topo, "participant", own, shared, port, folder, transport, roster)
    if "error" in launched:
        return launched
    documents = launched["documents"]
    reports = [party for document in documents for party in document["parties"]]  # each rank reports its own
    publisher = reports[-1]
    wire = launched["wire_tx_bytes_per_party"]
    return {
        "ttft_s": publisher["wall_s"] - publisher["decode_s"],
        "publisher_prefill_s": publisher["prefill_s"],
        "decode_s": publisher["decode_s"],
        "per_token_s": per_token_s(publisher["decode_s"], publisher["answer_token_ids"]),
        "total_s": publisher["wall_s"],
        "process_s": launched["process_s"],
        "wait_s": {r["name"]: r["wait_s"] for r in reports},
        "prefill_s": {r["name"]: r["prefill_s"] for r in reports},
        "link_bytes_sent": sum(r["link_bytes_sent"] for r in reports),
        "link_bytes_sent_per_party": [r["link_bytes_sent"] for r in reports],
        "expected_bytes_sent": sum(r["expected_bytes_sent"] for r in reports),
        "wire_tx_bytes": sum(wire),
        "wire_tx_bytes_per_party": wire,
        "answer": publisher["answer"],
        "answer_token_ids": publisher["answer_token_ids"],
        "sync_layers": documents[-1]["sync_layers"],
    }


def launch_in_namespaces(
    topo: Topology,
    command: str,
    own: list[list[str]],
    shared: list[str],
    port: int,
    folder: Path,
    transport: str = "torch",
    roster: Path | None = None,
    names: list[str] | None = None,
) -> dict:
    """``fedattn COMMAND`` once per party namespace over gloo (with a store in the switch namespace)
    or over gRPC with mutual TLS (each party's service on its own address): every rank's JSON report
    (``documents``), the seconds from spawn to the last exit and the bytes each party put on its veth;
    or ``error`` naming every rank that failed. ``names``: the parties, in rank order, in the first
    namespaces (default FedAttn's, one per namespace)."""
    names = names or party_names_of(topo.parties)
    world = len(names)
    store = None
    if transport == "torch":
        store = spawn(
            in_ns(SWITCH_NS, sys.executable, __file__, "--_store", str(port), str(world)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(folder / f"store-{port}.txt").open("w"),
            text=True,
        )
    parties: list[subprocess.Popen] = []
    try:
        if store is not None:
            wait_ready(store, "the rendezvous store")
        before = topo.tx_bytes(world)
        start = time.monotonic()
        for rank in range(world):
            report = folder / f"report-{port}-{rank}.json"
            report.unlink(missing_ok=True)
            words = [
                command,
                *rendezvous_words(transport, rank, names, port, roster),
                *own[rank],
                *shared,
                "--json",
                "--report",
                str(report),
            ]
            env = dict(common_env(1), GLOO_SOCKET_IFNAME=party_if(rank))
            parties.append(
                spawn(
                    in_ns(party_ns(rank), sys.executable, "-m", "fedattn.cli", *words),
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(folder / f"stderr-{port}-{rank}.txt").open("w"),
                )
            )
        codes = watch(parties, start)
        process_s = time.monotonic() - start
        after = topo.tx_bytes(world)
    finally:
        for child in parties:
            stop(child)
        if store is not None:
            if store.stdin:
                with contextlib.suppress(OSError):
                    store.stdin.close()
            stop(store)
    if any(code != 0 for code in codes):
        failures = []
        for rank, code in enumerate(codes):
            if code != 0:
                lines = [
                    line
                    for line in (folder / f"stderr-{port}-{rank}.txt").read_text(errors="replace").splitlines()
                    if line.strip()
                ]
                failures.append(f"rank {rank}: exit {code}: {lines[-1][:200] if lines else ''}")
        return {"error": "; ".join(failures), "process_s": process_s}
    return {
        "documents": [json.loads((folder / f"report-{port}-{rank}.json").read_text()) for rank in range(world)],
        "process_s": process_s,
        "wire_tx_bytes_per_party": [b - a for a, b in zip(before, after)],
    }


def watch(children: list[subprocess.Popen], start: float) -> list[int]:
    """Exit codes; once one fails the rest get the parties' own timeout to notice, then are killed."""
    failed_at = None
    while True:
        codes = [child.poll() for child in children]
        if all(code is not None for code in codes):
            return codes
        now = time.monotonic()
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = now
        if (failed_at is not None and now - failed_at > PARTY_TIMEOUT_S + 10) or now - start > RUN_LIMIT_S:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.05)


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def mb(value: float) -> str:
    return f"{value / 1e6:.1f}"


def run_key(profile: str, schedule: str, transport: str) -> str:
    return f"{profile} {schedule}" + ("" if transport == "torch" else f" {transport}")


def print_table(results: dict, profiles: list[Profile], schedules: list[str], transport: str) -> None:
    baselines, runs = results["baselines"], results["runs"]
    labels = []
    for profile in profiles:
        emulated = results["shaping"].get(profile.name, {}).get("delay_ms_emulated", 0)
        labels.append(profile.label + (f" {emulated:g} ms" if emulated else ""))
    threads = list(baselines)
    groups = [f"in-proc {key.split('=')[1]} thr" for key in threads] + labels
    width = 17
    header1 = (
        f"{'':17}"
        + "".join(f"{label:>{width}}" for label in groups)
        + f"{'link MB':>9}{'wire MB':>13}  tokens = in-proc"
    )
    header2 = f"{'schedule':17}" + "".join(f"{'TTFT / total s':>{width}}" for _ in groups)
    print(header1)
    print(header2)

    def cell(entry: dict | None) -> str:
        if entry is None:
            return f"{'-':>{width}}"
        if "error" in entry:
            return f"{'failed':>{width}}"
        return f"{entry['ttft_s']:9.2f} /{entry['total_s']:6.2f}"

    for schedule in schedules:
        cells = [cell(baselines[key].get(schedule)) for key in threads]
        inproc = baselines[threads[0]].get(schedule)  # the tokens every networked run is checked against
        links, wires, same = set(), [], []
        for profile in profiles:
            run = runs.get(run_key(profile.name, schedule, transport))
            cells.append(cell(run))
            if run and "error" not in run:
                links.add(run["link_bytes_sent"])
                wires.append(run["wire_tx_bytes"])
                if inproc and "error" not in inproc:
                    same.append("yes" if run["answer_token_ids"] == inproc["answer_token_ids"] else "NO")
        link = "/".join(mb(x) for x in sorted(links)) or "-"
        wire = f"{mb(min(wires))}-{mb(max(wires))}" if wires else "-"
        print(f"{schedule:17}" + "".join(cells) + f"{link:>9}{wire:>13}  {','.join(same) or '-'}")
    alone = "".join(cell(baselines[key].get("publisher alone")) for key in threads)
    print(f"{'publisher alone':17}" + alone + f"{'':>{width * len(profiles)}}{'0':>9}{'0':>13}  (no collaborators)")


def parse_transports(text: str) -> list[str]:
    transports = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [word for word in transports if word not in TRANSPORT_LABELS]
    if unknown or not transports:
        raise SetupError(f"--transports takes torch and/or grpc, got {text!r}")
    return transports


@contextlib.contextmanager
def namespaces(parties: int) -> Iterator[Topology]:
    """The topology of ``parties`` namespaces, removed at the end with every process this script started."""
    topo = Topology(parties)
    try:
        topo.setup()
        yield topo
    finally:
        for child in list(_children):
            stop(child)
        problems = topo.teardown()
        if problems:
            print("cleanup problems: " + "; ".join(problems), file=sys.stderr)


def note_delay_emulation(topo: Topology, results: dict) -> None:
    if topo.netem_error:
        results["delay_emulation"] = (
            f"unavailable: netem: {topo.netem_error}; delay is 0 in every profile (rate only, tbf)"
        )
    else:
        results["delay_emulation"] = "netem, half the one-way delay on each hop"
    print(f"delay emulation: {results['delay_emulation']}", flush=True)


def shape_and_probe(topo: Topology, profile: Profile, results: dict) -> None:
    """Shape every link as ``profile`` says, then measure what the links give (party 0 to the last)."""
    results["shaping"][profile.name] = topo.shape(profile)
    got = results["probes"][profile.name] = probe(profile, topo.parties)
    measured = (
        f"{got['mbit_s']:.1f} Mbit/s, RTT {got['rtt_ms']:.2f} ms" if "error" not in got else f"failed: {got['error']}"
    )
    print(f"{profile.label}: probe p0 -> p{topo.parties - 1}: {measured}", flush=True)


def bench(args: argparse.Namespace) -> int:
    profiles = [p for p in PROFILES if p.name == "100mbit"] if args.quick else PROFILES
    schedules = [s for s in SCHEDULES if s[0] in ("H=1", "publisher-dense")] if args.quick else SCHEDULES
    threads = list(dict.fromkeys(int(word) for word in args.baseline_threads.split(",")))
    transports = parse_transports(args.transports)
    started = time.monotonic()
    results: dict = {
        "model": args.model,
        "parties": args.parties,
        "max_new_tokens": args.max_new_tokens,
        "threads_per_party_process": 1,
        "threads_of_baselines": threads,
        "transports": transports,
        "load_average_before": load_average(),
        "definitions": {
            "ttft_s": "networked: the publisher's wall_s - decode_s, i.e. from the start of its run (all parties "
            "joined, gloo group up; before the hello handshake) to its first token; in-process and alone: "
            "timing.prefill_s",
            "publisher_prefill_s": "networked: the publisher's prefill_s, from the end of its hello handshake (it "
            "holds every party's hello) to its first token",
            "total_s": "the publisher's wall_s (model load and join excluded); in-process and alone: timing.wall_s",
            "process_s": "spawn of the 4 participant processes to the last exit, model loads included",
            "link_bytes_sent": "sum over parties of the transport's link_bytes_sent (frames + size words)",
            "expected_bytes_sent": "the cost model's bytes, one copy of each frame "
            "(link_bytes_sent counts one per addressee)",
            "wire_tx_bytes": "sum over parties of the tx bytes counted on their veth: TCP/IP headers, ACKs and "
            "store traffic included",
        },
        "store": f"a TCPStore helper in the switch namespace at {SWITCH_IP}, parties use --external-store",
        "baselines": {},
        "runs": {},
        "probes": {},
        "shaping": {},
    }
    with tempfile.TemporaryDirectory(prefix="fa-netbench-") as workdir, namespaces(args.parties) as topo:
        folder = Path(workdir)
        contexts, question, prompt = prompt_texts(args.model, args.parties, args.shots, args.item)
        results["prompt"] = prompt
        context_args = [write_private(folder, f"context-{r}.txt", text) for r, text in enumerate(contexts)]
        question_arg = write_private(folder, "question.txt", question)
        own = [["--context", a] for a in context_args] + [["--question", question_arg]]
        base = ["--model", args.model, "--raw", "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu"]
        print(
            f"{args.model}: N = {args.parties}, prompt {prompt['total_tokens']} tokens in "
            f"{prompt['segment_tokens']} "
            f"(same ids as tokex_segments: {prompt['same_ids_as_tokex_segments']}), --raw, "
            f"{args.max_new_tokens} new tokens, "
            f"OMP_NUM_THREADS=1 in every party process ({args.parties} parties share {os.cpu_count()} cores), "
            f"{' and '.join(map(str, threads))} in the in-process and publisher-alone runs",
            flush=True,
        )
        note_delay_emulation(topo, results)

        contexts_words = [word for a in context_args for word in ("--context", a)]
        for count in threads:  # baselines first: no network, host namespace
            found = results["baselines"][f"threads={count}"] = {}
            for name, words in schedules:
                found[name] = run_cli([*base, *contexts_words, "--question", question_arg, *words], threads=count)
                print(f"  in-process {name}, {count} thread(s): {_brief(found[name])}", flush=True)
            found["publisher alone"] = run_cli([*base, "--question", question_arg], threads=count)
            print(f"  publisher alone, {count} thread(s): {_brief(found['publisher alone'])}", flush=True)

        port = STORE_PORT_BASE
        roster = federation(folder, party_names_of(args.parties)) if "grpc" in transports else None
        for profile in profiles:
            shape_and_probe(topo, profile, results)
            for name, words in schedules:
                port += 1
                shared = [*base, *words, "--timeout", str(PARTY_TIMEOUT_S)]
                for transport in transports:
                    run = run_networked(topo, own, shared, port, folder, transport, roster)
                    results["runs"][run_key(profile.name, name, transport)] = run
                    print(f"  {name} over {TRANSPORT_LABELS[transport]}: {_brief(run)}", flush=True)

    results["load_average_after"] = load_average()
    results["elapsed_s"] = time.monotonic() - started
    for transport in transports:
        print(f"\nover {TRANSPORT_LABELS[transport]}")
        print_table(results, profiles, [name for name, _ in schedules], transport)
    answers = {}
    flat = [
        (f"in-proc {name} ({key})", entry)
        for key, group in results["baselines"].items()
        for name, entry in group.items()
    ]
    for key, entry in [*flat, *results["runs"].items()]:
        if "answer" in entry:
            answers.setdefault(entry["answer"], []).append(key)
    print()
    for answer, keys in answers.items():
        print(f"answer {json.dumps(answer[:110])}{'...' if len(answer) > 110 else ''}\n    from: {', '.join(keys)}")
    print(
        f"\nTTFT: networked = publisher wall_s - decode_s (its run after join, handshake included, "
        f"to its first token); "
        f"in-process / alone = timing.prefill_s. total = publisher wall_s. Single runs; 1 thread per party process, "
        f"{' or '.join(map(str, threads))} for in-process / alone."
    )
    print(f"delay: {results['delay_emulation']}")
    close_results(results, args.out)
    failed = [key for key, entry in results["runs"].items() if "error" in entry]
    return 1 if failed else 0


# -- --system split: FedSEA split inference against centralized inference and FedAttn's retrieval --------


def split_figures(document: dict) -> dict:
    """The split client's figures from a ``fedattn split`` document (or the client's own report):
    TTFT = its prefill_s (hello to first token), per token = its per_token_s, total = hello to last token."""
    if "error" in document:
        return document
    timing = document["timing"]
    return {
        "ttft_s": timing["prefill_s"],
        "per_token_s": timing["per_token_s"],
        "decode_s": timing["decode_s"],
        "total_s": timing["prefill_s"] + timing["decode_s"],
        "client_compute_s": timing["client_compute_s"],
        "measured_bytes_sent": document["measured_bytes"]["sent"],
        "answer": document["answer"],
        "answer_token_ids": document["answer_token_ids"],
    }


def run_split_networked(
    topo: Topology, prompt_arg: str, shared: list[str], port: int, folder: Path, transport: str, roster: Path | None
) -> dict:
    """One split query: ``fedattn split-party``, the server in the first namespace, the client (with
    the prompt) in the second (``launch_in_namespaces``)."""
    from fedattn.systems.fedsea.inprocess import party_names
    from fedattn.systems.fedsea.networked import CLIENT_RANK

    own = [[], ["--prompt", prompt_arg]]
    launched = launch_in_namespaces(topo, "split-party", own, shared, port, folder, transport, roster, party_names(1))
    if "error" in launched:
        return launched
    documents, wire = launched["documents"], launched["wire_tx_bytes_per_party"]
    return {
        **split_figures(documents[CLIENT_RANK]),
        "process_s": launched["process_s"],
        "link_bytes_sent": sum(party["link_bytes_sent"] for document in documents for party in document["parties"]),
        "wire_tx_bytes": sum(wire),
        "wire_tx_bytes_per_party": wire,
    }


def median_run(samples: list[dict]) -> dict:
    """The samples' medians of the times (the bytes and answer are the first sample's), or the first failure."""
    failed = [sample for sample in samples if "error" in sample]
    if failed:
        return failed[0]
    times = {key: statistics.median(sample[key] for sample in samples) for key in ("ttft_s", "per_token_s", "total_s")}
    return {**samples[0], **times, "samples": samples}


def print_split_table(results: dict, profiles: list[Profile], transport: str) -> None:
    central = results["centralized"]
    reference = next(iter(central.values()))  # 1 thread, as one party
    rows = [("no link", f"centralized, {key.split('=')[1]} thread(s)", entry) for key, entry in central.items()]
    rows.append(("no link", f"split A,C = {results['client_blocks']}, in-process", results["split_in_process"]))
    for profile in profiles:
        emulated = results["shaping"].get(profile.name, {}).get("delay_ms_emulated", 0)
        label = profile.label + (f" {emulated:g} ms" if emulated else "")
        rows.append(
            (
                label,
                f"split A,C = {results['client_blocks']}",
                results["runs"].get(run_key(profile.name, "split", transport)),
            )
        )
        rows.append(
            (
                label,
                f"FedAttn retrieval, N = {results['parties']}",
                results["runs"].get(run_key(profile.name, "retrieval", transport)),
            )
        )
    print(
        f"{'link':22}{'system':30}{'TTFT s':>8}{'ms/token':>10}{'total s':>9}{'link MB':>9}{'wire MB':>9}"
        "  tokens = centralized"
    )
    for link, system, entry in rows:
        if entry is None or "error" in entry:
            print(f"{link:22}{system:30}{'-' if entry is None else 'failed':>8}")
            continue
        same = "-"
        if "error" not in reference:
            same = "yes" if entry["answer_token_ids"] == reference["answer_token_ids"] else "NO"
        link_mb = mb(entry["link_bytes_sent"]) if entry.get("link_bytes_sent") is not None else "-"
        wire_mb = mb(entry["wire_tx_bytes"]) if "wire_tx_bytes" in entry else "-"
        print(
            f"{link:22}{system:30}{entry['ttft_s']:8.2f}{entry['per_token_s'] * 1000:10.1f}{entry['total_s']:9.2f}"
            f"{link_mb:>9}{wire_mb:>9}  {len(entry['answer_token_ids'])} {same}"
        )


def bench_split(args: argparse.Namespace) -> int:
    """Split inference (server in the first namespace, client in the second) against centralized
    inference and FedAttn's ``retrieval`` schedule (N parties, the prompt cut as ``bench`` cuts it),
    the same prompt, on every profile."""
    threads = [1] if args.quick else list(dict.fromkeys(int(word) for word in args.baseline_threads.split(",")))
    transports = parse_transports(args.transports)
    repeats = args.repeats or (1 if args.quick else 3)
    started = time.monotonic()
    results: dict = {
        "system": "split",
        "model": args.model,
        "parties": args.parties,
        "client_blocks": args.client_blocks,
        "max_new_tokens": args.max_new_tokens,
        "repeats": repeats,
        "threads_per_party_process": 1,
        "transports": transports,
        "load_average_before": load_average(),
        "definitions": {
            "ttft_s": "split: the client's prefill_s (its hello to its first token); FedAttn: the publisher's wall_s - "
            "decode_s (its run after join, handshake included, to its first token); centralized: timing.prefill_s",
            "per_token_s": "mean seconds per generated token after the first (decode_s / (tokens - 1))",
            "total_s": "split: the client's prefill_s + decode_s (hello to last token); FedAttn: the publisher's "
            "wall_s (model load and join excluded); centralized: timing.wall_s",
            "link_bytes_sent": "sum over parties of the transport's link_bytes_sent (frames + size words)",
            "wire_tx_bytes": "sum over the run's parties of the tx bytes counted on their veth",
            "repeats": "networked figures: medians of the times over this many runs, interleaved (split, FedAttn)",
        },
        "centralized": {},
        "runs": {},
        "probes": {},
        "shaping": {},
    }
    with tempfile.TemporaryDirectory(prefix="fa-netbench-") as workdir, namespaces(max(args.parties, 2)) as topo:
        folder = Path(workdir)
        contexts, question, prompt = prompt_texts(args.model, args.parties, args.shots, args.item)
        results["prompt"] = prompt
        whole_arg = write_private(folder, "prompt.txt", "".join(contexts) + question)
        context_args = [write_private(folder, f"context-{r}.txt", text) for r, text in enumerate(contexts)]
        fedattn_own = [["--context", a] for a in context_args] + [
            ["--question", write_private(folder, "question.txt", question)]
        ]
        base = ["--model", args.model, "--raw", "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu"]
        split_words = ["--client-blocks", args.client_blocks, *args.split_option]
        print(
            f"{args.model}: the GSM8K {args.shots}-shot prompt, --raw, {args.max_new_tokens} new tokens; split: A,C = "
            f"{' '.join([args.client_blocks, *args.split_option])}, the whole prompt ({prompt['whole_prompt_tokens']} "
            f"tokens) at the client; FedAttn retrieval: N = {args.parties}, {prompt['total_tokens']} tokens in "
            f"{prompt['segment_tokens']}; OMP_NUM_THREADS=1 in every party process, "
            f"{' and '.join(map(str, threads))} in the centralized run; {repeats} run(s) per networked cell",
            flush=True,
        )
        note_delay_emulation(topo, results)
        for count in threads:  # no network, host namespace
            found = results["centralized"][f"threads={count}"] = run_cli([*base, "--question", whole_arg], count)
            print(f"  centralized, {count} thread(s): {_brief(found)}", flush=True)
        found = results["split_in_process"] = split_figures(
            cli_document(["split", *base, *split_words, "--prompt", whole_arg], 1)
        )
        print(f"  split in-process, 1 thread: {_brief(found)}", flush=True)

        from fedattn.systems.fedsea.inprocess import party_names

        grpc = "grpc" in transports
        split_roster = federation(folder, party_names(1)) if grpc else None
        fedattn_roster = federation(folder, party_names_of(args.parties)) if grpc else None
        port = STORE_PORT_BASE
        for profile in PROFILES:
            shape_and_probe(topo, profile, results)
            for transport in transports:
                samples: dict[str, list[dict]] = {"split": [], "retrieval": []}
                for _ in range(repeats):
                    port += 2
                    shared = [*base, *split_words, "--timeout", str(PARTY_TIMEOUT_S)]
                    samples["split"].append(
                        run_split_networked(topo, whole_arg, shared, port, folder, transport, split_roster)
                    )
                    shared = [*base, "--schedule", "retrieval", "--timeout", str(PARTY_TIMEOUT_S)]
                    samples["retrieval"].append(
                        run_networked(topo, fedattn_own, shared, port + 1, folder, transport, fedattn_roster)
                    )
                for name, runs in samples.items():
                    run = results["runs"][run_key(profile.name, name, transport)] = median_run(runs)
                    print(f"  {name} over {TRANSPORT_LABELS[transport]}: {_brief(run)}", flush=True)

    results["load_average_after"] = load_average()
    results["elapsed_s"] = time.monotonic() - started
    for transport in transports:
        print(f"\nover {TRANSPORT_LABELS[transport]}")
        print_split_table(results, PROFILES, transport)
    print(
        "\nTTFT: split = client prefill_s (hello to first token); FedAttn = publisher wall_s - decode_s; "
        "centralized = prefill_s. ms/token: decode_s / (tokens - 1). total: split = hello to last token; "
        "FedAttn = publisher wall_s. "
        f"{'Medians of ' + str(repeats) + ' runs' if repeats > 1 else 'Single runs'} on the links; centralized and "
        f"in-process: single runs. tokens = centralized: the answer's ids against the centralized 1-thread run's "
        "(retrieval sends K/V as int4-kivi, so its tokens may differ; split with float32 hidden states and no noise "
        "should not)."
    )
    print(f"delay: {results['delay_emulation']}")
    close_results(results, args.out)
    failed = [key for key, entry in results["runs"].items() if "error" in entry]
    return 1 if failed else 0


def close_results(results: dict, out: Path | None) -> None:
    """The load the figures were taken under, and every figure to ``out`` (JSON)."""
    print(
        f"\nload average before/after: {results['load_average_before']} / {results['load_average_after']}; "
        f"elapsed {results['elapsed_s']:.0f} s"
    )
    if out:
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")


def _brief(entry: dict) -> str:
    if "error" in entry:
        return f"FAILED: {entry['error']}"
    text = f"TTFT {entry['ttft_s']:.2f} s, total {entry['total_s']:.2f} s"
    if "per_token_s" in entry:
        text += f", {entry['per_token_s'] * 1000:.0f} ms per token"
    if entry.get("link_bytes_sent") is not None:
        text += (
            f", link {mb(entry['link_bytes_sent'])} MB, wire {mb(entry['wire_tx_bytes'])} MB, "
            f"processes {entry['process_s']:.1f} s"
        )
    return text


def preflight() -> None:
    if not sys.platform.startswith("linux"):
        raise Skip("network namespaces need Linux")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise Skip(f"'{tool}' (iproute2) is not installed")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("--_"):
        mode, rest = sys.argv[1], sys.argv[2:]
        if mode == "--_store":
            serve_store(int(rest[0]), int(rest[1]))
        elif mode == "--_probe-server":
            probe_server(rest[0], int(rest[1]))
        elif mode == "--_probe-client":
            probe_client(rest[0], int(rest[1]), int(rest[2]))
        return 0

    from fedattn.runtime.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--system",
        choices=("fedattn", "split"),
        default="fedattn",
        help="fedattn (default): FedAttn's schedules; split: FedSEA split inference against centralized "
        "inference and FedAttn's retrieval schedule, on every profile",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fedattn: only 100 Mbit/s, H = 1 and publisher-dense; split: one run per cell, centralized at 1 thread",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--item", type=int, default=0, help="GSM8K test item used as the question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--client-blocks", default="2,2", metavar="A,C", help="split: the client's first and last blocks"
    )
    parser.add_argument(
        "--split-option",
        action="append",
        default=[],
        metavar="WORD",
        help="split: a word for both split parties, e.g. --split-option=--hidden-codec --split-option=bfloat16",
    )
    parser.add_argument("--repeats", type=int, help="split: runs per networked cell, medians (default 3; --quick 1)")
    parser.add_argument(
        "--transports",
        default="torch",
        help="a comma list of torch (gloo) and grpc (mutual TLS): each query runs over each, interleaved",
    )
    parser.add_argument(
        "--baseline-threads",
        default=f"1,{os.cpu_count()}",
        metavar="T1,T2",
        help="thread counts of the in-process and publisher-alone runs (default: 1, as each party, and all "
        "cores, which the party processes share)",
    )
    args = parser.parse_args()

    def terminate(signum, frame):  # noqa: ARG001 - SIGTERM runs the same cleanup as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a shell started us with SIGINT ignored
    try:
        preflight()
        try:
            lock = LOCK_PATH.open("w")
        except OSError:
            lock = (Path(tempfile.gettempdir()) / LOCK_PATH.name).open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("bench/network.py: another run holds the fa- namespaces; try again later", file=sys.stderr)
            return 1
        return bench_split(args) if args.system == "split" else bench(args)
    except Skip as reason:
        print(f"bench/network.py: skipped: {reason}")
        return 0
    except SetupError as error:
        print(f"bench/network.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/network.py: interrupted; namespaces removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
