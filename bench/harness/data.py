"""Training data: each (step, global micro-batch index) maps to one deterministic batch.

Global micro-batch index ``m = dp_rank * grad_accum + micro_step``: every data-parallel rank
reads its own shard of the global batch, and a single process with ``grad_accum * dp`` micro
steps reads exactly the same global batch -- which is what makes strategies comparable.

- ``synthetic``: uniform random tokens drawn on the device, each sequence from a generator
  seeded by (seed, step, global sequence id = m * micro_batch + row): no host-to-device copy,
  no hidden sync, and the same global batch however it is split into micro-batches.
- ``markov``: a learnable language with a known floor (``MarkovData``): every token has ``MARKOV_SUCCESSORS``
  possible next tokens with fixed seeded probabilities (one chain for every run and seed: the same language
  everywhere, no download); sequences are drawn like ``synthetic``'s, one generator per (seed, step, sequence
  id). ``markov_floor`` is the exact expected loss of the chain itself on these sequences, the lowest any model
  can reach: an absolute target that is the same on every machine.
- a path: token windows of seq_len+1 gathered in a seeded shuffled order (``TokenData``). What the path
  holds decides how it becomes tokens (``load_tokens``):
  - nanoGPT's ``train.bin`` (the file, or a folder holding it): uint16 token ids, memory-mapped, windows
    gathered on the host (the file can be larger than memory);
  - a saved Hugging Face dataset (a ``datasets.save_to_disk`` folder; a DatasetDict's ``train`` split): its
    ``input_ids`` column as it is, else its ``text`` column tokenized;
  - anything else is text (a file, or every file under a folder, sorted): tokenized with the checkpoint's
    tokenizer when ``model.hf_path`` has a ``tokenizer.json`` (documents joined by its end-of-text token),
    else bytes are tokens (byte-level, ids 0..255).
  In-memory tokens are put on the device once and windows are gathered there. Every id must be below the
  model's vocabulary.

The held-out split (``build_data(..., split="eval")``, the run's ``eval_every``): batches no training step reads,
the same for every run seed (a fixed validation set, as the speedrun's):
- ``synthetic`` and ``markov``: sequences drawn with ``EVAL_SEED`` at steps from ``EVAL_FIRST_STEP`` on, far
  beyond any training step (config MAX_STEPS);
- a path: the last ``EVAL_FRACTION`` of its windows (at least one), read in order; training then reads only the
  windows before them (``split="train"``). A nanoGPT folder with a ``val.bin`` beside ``train.bin`` uses that file
  instead, nanoGPT's own split, and trains on all of ``train.bin``.
"""

from __future__ import annotations

from pathlib import Path

import torch

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def batch_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed unique to (seed, step, sequence index)."""
    return (seed * _MIX[0] + (step + 1) * _MIX[1] + (index + 1) * _MIX[2]) % (2**63 - 1)


EVAL_SEED = 0x5EED_E7A1  # the held-out set of synthetic and markov: one for every run seed
EVAL_FIRST_STEP = 2**40  # held-out batch k is data step EVAL_FIRST_STEP + k: never a training step
EVAL_FRACTION = 0.1  # of a corpus's windows, held out at its end


class SyntheticData:
    """Uniform random tokens in [0, vocab_size); ``first_step``: the data step that batch step 0 reads."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int, device: torch.device,
                 first_step: int = 0):
        self.vocab_size, self.B, self.T, self.seed, self.device = vocab_size, micro_batch, seq_len, seed, device
        self.first_step = first_step

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the device."""
        gen = torch.Generator(device=self.device)
        rows = []
        for b in range(self.B):
            gen.manual_seed(batch_seed(self.seed, self.first_step + step, index * self.B + b))
            rows.append(torch.randint(0, self.vocab_size, (self.T + 1,), generator=gen, device=self.device))
        seq = torch.stack(rows)  # (B, T+1)
        return seq[:, :-1], seq[:, 1:]


BUILT_IN = ("synthetic", "markov")  # the sources that need no file
MARKOV_SUCCESSORS = 4  # next tokens each token can have
MARKOV_CHAIN_SEED = 20261203  # the one language: the chain does not change with the run's seed


def markov_chain(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain over ``vocab_size`` tokens: ``successors`` (V, K) int64 (K distinct next tokens per token: v plus
    K increasing random offsets below V, modulo V) and ``probs`` (V, K) float64 (their probabilities, a
    Dirichlet(0.5) draw per token: some next tokens likely, some rare), from ``MARKOV_CHAIN_SEED``. O(V K): GPT-2's
    50,257 tokens take milliseconds."""
    k = min(MARKOV_SUCCESSORS, vocab_size)
    gen = torch.Generator().manual_seed(MARKOV_CHAIN_SEED)
    steps = torch.randint(1, max(2, vocab_size // k), (vocab_size, k), generator=gen)  # K steps sum below V
    successors = (torch.arange(vocab_size)[:, None] + steps.cumsum(1)) % vocab_size
    gamma = torch._standard_gamma(torch.full((vocab_size, k), 0.5, dtype=torch.float64), generator=gen)
    return successors, gamma / gamma.sum(1, keepdim=True)


def markov_floor(vocab_size: int, seq_len: int) -> float:
    """The expected next-token loss (nats per token, natural log) of the chain itself over a sequence of
    ``markov``: position t predicts token t+1 from token t, whose distribution is the first token's (uniform)
    moved t steps along the chain, mu_t = mu_0 P^t; floor = mean over t < seq_len of sum_v mu_t(v) H(P_v), with
    H(P_v) = -sum_k p_vk ln p_vk. Exact (no stationarity assumed)."""
    successors, probs = markov_chain(vocab_size)
    entropy = -(probs * probs.log()).sum(1)  # H(P_v), (V,)
    mu = torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64)
    total = 0.0
    for _ in range(seq_len):
        total += float(mu @ entropy)
        mu = torch.zeros_like(mu).index_add_(0, successors.reshape(-1), (mu[:, None] * probs).reshape(-1))
    return total / seq_len


class MarkovData:
    """Sequences of the ``markov`` language (module docstring), each from its own seeded generator;
    ``first_step`` as SyntheticData's."""

    def __init__(self, vocab_size: int, micro_batch: int, seq_len: int, seed: int, device: torch.device,
                 first_step: int = 0):
        self.V, self.B, self.T, self.seed, self.device = vocab_size, micro_batch, seq_len, seed, device
        self.first_step = first_step
        successors, probs = markov_chain(vocab_size)
        self.successors = successors.to(device)
        self.cumulative = probs.cumsum(1).float().to(device)
        self.cumulative[:, -1] = 1.0  # a uniform draw below 1 always lands on a successor

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64 on the device."""
        gen = torch.Generator(device=self.device)
        first, draws = [], []
        for b in range(self.B):
            gen.manual_seed(batch_seed(self.seed, self.first_step + step, index * self.B + b))
            first.append(torch.randint(0, self.V, (1,), generator=gen, device=self.device))
            draws.append(torch.rand(self.T, generator=gen, device=self.device))
        u = torch.stack(draws, 1)  # (T, B): the uniform draw that picks each next token
        seq = [torch.cat(first)]
        for t in range(self.T):
            at = seq[-1]
            pick = torch.searchsorted(self.cumulative[at], u[t].unsqueeze(1)).squeeze(1)
            seq.append(self.successors[at, pick])
        seq = torch.stack(seq, 1)  # (B, T+1)
        return seq[:, :-1], seq[:, 1:]


HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).is_file() for m in HF_DATASET_MARKERS)


def _nanogpt_bin(p: Path) -> Path | None:
    if p.is_file() and p.suffix == ".bin":
        return p
    return p / "train.bin" if p.is_dir() and (p / "train.bin").is_file() else None


def data_kind(data: str) -> str:
    """'synthetic', 'markov', 'nanogpt' (uint16 train.bin), 'hf-dataset' (save_to_disk folder) or 'text'."""
    if data in BUILT_IN:
        return data
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"data={data!r}: no such file or folder (use data=synthetic, data=markov, a text "
                                "file or folder, a nanoGPT train.bin or a saved Hugging Face dataset)")
    return "nanogpt" if _nanogpt_bin(p) else "hf-dataset" if _hf_dataset_dir(p) else "text"


def read_bytes(path: str | Path) -> bytes:
    """All bytes of a file, or of every file under a folder (sorted paths)."""
    return b"".join(f.read_bytes() for f in _text_files(Path(path)))


class Tokenizer:
    """The checkpoint's tokenizer (``tokenizer.json``, read with the ``tokenizers`` library), or byte-level."""

    def __init__(self, tokenizer_dir: str = ""):
        file = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir else None
        self.tok = None
        self.eos: int | None = None
        if file is not None and file.is_file():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError as exc:
                raise ModuleNotFoundError("tokenizing with model.hf_path's tokenizer.json needs the [hf] extra: "
                                          "pip install -e '.[hf]'") from exc
            self.tok = HFTokenizer.from_file(str(file))
            self.eos = self._eos_id(Path(tokenizer_dir))
        self.name = str(file) if self.tok else "bytes"

    def _eos_id(self, folder: Path) -> int | None:
        """The end-of-text id: tokenizer_config.json's ``eos_token``, else a usual name in the vocabulary."""
        import json

        conf = folder / "tokenizer_config.json"
        names = []
        if conf.is_file():
            eos = json.loads(conf.read_text()).get("eos_token")
            names.append(eos.get("content") if isinstance(eos, dict) else eos)
        names += ["<|endoftext|>", "</s>", "<eos>"]
        return next((self.tok.token_to_id(n) for n in names if n and self.tok.token_to_id(n) is not None), None)

    def encode_docs(self, docs: list[str]) -> list[int]:
        """Token ids of the documents in order, each followed by the end-of-text id when there is one."""
        if self.tok is None:
            return list(b"".join(d.encode() for d in docs))
        out: list[int] = []
        for enc in self.tok.encode_batch(docs, add_special_tokens=False):
            out += enc.ids
            if self.eos is not None:
                out.append(self.eos)
        return out


def _dataset_tokens(path: Path, tokenizer: Tokenizer) -> list[int] | torch.Tensor:
    try:
        import datasets
    except ImportError as exc:
        raise ModuleNotFoundError(f"data={str(path)!r} is a saved Hugging Face dataset; reading it needs the [hf] "
                                  "extra: pip install -e '.[hf]'") from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"data={str(path)!r}: the dataset has splits {list(ds)}, none named 'train'")
        ds = ds["train"]
    if "input_ids" in ds.column_names:
        ids = [i for row in ds["input_ids"] for i in row]
        return torch.tensor(ids, dtype=torch.int64)
    if "text" in ds.column_names:
        return tokenizer.encode_docs(list(ds["text"]))
    raise ValueError(f"data={str(path)!r}: the dataset has columns {ds.column_names}; need 'input_ids' or 'text'")


_LOADED: dict[tuple[str, str], tuple] = {}  # (data, tokenizer dir) -> tokens: config checks, then the run, load once


def load_tokens(data: str, tokenizer_dir: str = "") -> tuple[object, str]:
    """The corpus as token ids (a torch int tensor, or a numpy memmap for train.bin) and how it was read."""
    key = (data, tokenizer_dir)
    if key not in _LOADED:
        kind, p = data_kind(data), Path(data)
        if kind == "nanogpt":
            import numpy as np

            tokens, how = np.memmap(_nanogpt_bin(p), dtype=np.uint16, mode="r"), "nanoGPT uint16 train.bin"
        else:
            tok = Tokenizer(tokenizer_dir)
            ids = _dataset_tokens(p, tok) if kind == "hf-dataset" else (
                tok.encode_docs([f.read_text() for f in _text_files(p)]) if tok.tok else read_bytes(p))
            if isinstance(ids, bytes | bytearray):
                tokens = (torch.frombuffer(bytearray(ids), dtype=torch.uint8) if ids
                          else torch.empty(0, dtype=torch.uint8))
            else:
                tokens = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.int64)
                tokens = tokens.to(torch.int32 if tokens.numel() and int(tokens.max()) < 2**31 else torch.int64)
            how = f"{kind}, tokens from {tok.name}" if not (kind == "hf-dataset" and isinstance(ids, torch.Tensor)) \
                else "hf-dataset input_ids"
        _LOADED[key] = (tokens, how)
    return _LOADED[key]


def _text_files(p: Path) -> list[Path]:
    return [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


def val_bin(data: str) -> Path | None:
    """nanoGPT's held-out file: ``val.bin`` beside the ``train.bin`` of a folder ``data``, else None."""
    p = Path(data)
    return p / "val.bin" if p.is_dir() and (p / "train.bin").is_file() and (p / "val.bin").is_file() else None


def data_problem(data: str, seq_len: int, micro_batch: int, vocab_size: int, tokenizer_dir: str = "",
                 held_out: bool = False) -> str | None:
    """Why ``data`` cannot feed this run (missing, too short for one micro-batch -- of the training part when
    ``held_out`` windows are set aside --, ids beyond the vocabulary), or None. Loads (and keeps) the tokens, so
    the run reads them once."""
    try:
        tokens, how = load_tokens(data, tokenizer_dir)
    except (OSError, ValueError) as exc:
        return str(exc).removeprefix(f"data={data!r}: ")
    n = len(tokens)
    need = micro_batch * seq_len + 1
    if n < need:
        return (f"holds {n} tokens ({how}); one micro-batch of micro_batch={micro_batch} windows of "
                f"seq_len={seq_len} needs at least {need}")
    top = int(tokens.max()) if n else 0
    if top >= vocab_size:
        return f"has token id {top} ({how}) but the model's vocab_size={vocab_size}: ids must be below it"
    if held_out and val_bin(data) is None:
        train, _ = split_windows((n - 1) // seq_len)
        if train < micro_batch:
            return (f"holds {(n - 1) // seq_len} windows of seq_len={seq_len}; with {EVAL_FRACTION:.0%} held out "
                    f"for eval_every the {train} left cannot fill micro_batch={micro_batch} (more data, a shorter "
                    "seq_len, or eval_every=0)")
    if held_out and val_bin(data) is not None:
        import numpy as np

        val = np.memmap(val_bin(data), dtype=np.uint16, mode="r")
        if len(val) < seq_len + 1:
            return f"its val.bin holds {len(val)} tokens: fewer than one window of seq_len={seq_len}+1"
        if len(val) and int(val.max()) >= vocab_size:
            return f"its val.bin has token id {int(val.max())} but the model's vocab_size={vocab_size}"
    return None


def split_windows(n_windows: int) -> tuple[int, int]:
    """(training windows, held-out windows) of a corpus of ``n_windows``: the last EVAL_FRACTION (at least one)
    held out."""
    held = max(1, int(n_windows * EVAL_FRACTION))
    return n_windows - held, held


class TokenData:
    """Windows of seq_len+1 tokens of a corpus, read in the order ``windows`` (window numbers; a seeded shuffle
    for training, in order for the held-out split); ``n_micro`` = micro-batches per step in the whole job.
    In-memory tokens live on the device; a memory-mapped train.bin is gathered on the host."""

    def __init__(self, tokens, micro_batch: int, seq_len: int, device: torch.device, n_micro: int,
                 windows: torch.Tensor, name: str = "data"):
        self.n_windows = len(windows)
        if self.n_windows < 1:
            raise ValueError(f"data={name!r}: no window of seq_len={seq_len}+1 to read")
        self.B, self.T, self.n_micro, self.device = micro_batch, seq_len, n_micro, device
        self.mapped = not isinstance(tokens, torch.Tensor)
        gather_on = torch.device("cpu") if self.mapped else device
        self.tokens = tokens if self.mapped else tokens.to(device)
        self.order = windows.to(gather_on)
        self.offsets = torch.arange(seq_len + 1, device=gather_on)
        self.rows = torch.arange(micro_batch, device=gather_on)

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = (step * self.n_micro + index) * self.B  # python int: no host-device traffic
        windows = self.order[(self.rows + first) % self.n_windows]  # (B,)
        at = windows[:, None] * self.T + self.offsets  # (B, T+1) token positions
        if self.mapped:
            seq = torch.from_numpy(self.tokens[at.numpy()].astype("int64")).to(self.device)
        else:
            seq = self.tokens[at].long()
        return seq[:, :-1], seq[:, 1:]


def build_data(data: str, vocab_size: int, micro_batch: int, seq_len: int, seed: int, device: torch.device,
               n_micro: int, tokenizer_dir: str = "", split: str = "all"):
    """``data='synthetic'``, ``'markov'`` or a path (see the module docstring); ids must be below ``vocab_size``.
    ``split``: "all" (no held-out set: training reads everything), "train" (training, the held-out windows left
    out) or "eval" (the held-out set)."""
    held = split == "eval"
    if data in BUILT_IN:
        cls = SyntheticData if data == "synthetic" else MarkovData
        return cls(vocab_size, micro_batch, seq_len, EVAL_SEED if held else seed, device,
                   EVAL_FIRST_STEP if held else 0)
    problem = data_problem(data, seq_len, micro_batch, vocab_size, tokenizer_dir, held_out=split != "all")
    if problem:
        raise ValueError(f"data={data!r}: {problem}")
    tokens, _ = load_tokens(data, tokenizer_dir)
    if split != "all" and val_bin(data) is not None:  # nanoGPT's own split: all of train.bin trains
        if not held:
            split = "all"
        else:
            import numpy as np

            tokens = np.memmap(val_bin(data), dtype=np.uint16, mode="r")
            return TokenData(tokens, micro_batch, seq_len, device, n_micro, torch.arange((len(tokens) - 1) // seq_len),
                             f"{data}/val.bin")
    n_all = (len(tokens) - 1) // seq_len
    if split == "all":
        if n_all < micro_batch:
            raise ValueError(f"data={data!r}: {len(tokens)} tokens hold only {n_all} windows of seq_len={seq_len}+1; "
                             f"need at least micro_batch={micro_batch}")
        windows = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))
    else:
        train, _ = split_windows(n_all)
        windows = (torch.arange(train, n_all) if held
                   else torch.randperm(train, generator=torch.Generator().manual_seed(seed)))
    return TokenData(tokens, micro_batch, seq_len, device, n_micro, windows, data)
