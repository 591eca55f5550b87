"""Train the small GPT-2 shipped as ``GPT2.from_pretrained("embedded")``.

The corpus is Jane Austen's six completed novels (public domain; Project Gutenberg
transcriptions) as packaged by the MIT-licensed R package *janeaustenr* in Debian's
``r-cran-janeaustenr``. We read the novels straight from the ``.deb`` (no R needed): the package
stores each novel as an R character vector (one entry per printed line) in a lazy-load database.

The model is character-level (the vocabulary is the 81 characters the novels use), 4 layers,
n_embd 128, 4 heads, trained on rows of 128 characters and shipped with a context of 64:
about 0.8M parameters, 3 MB of fp32. One run of 1,500 steps of 32 x 128 characters (AdamW,
warm-up, cosine decay) takes about 7 minutes on 2 idle cores with ``--threads 2``:

- steps 0-649: half of each batch is prose, half *copy rows* (a random string of letters
  repeated to fill the row). Nothing but copying predicts a random string's second
  occurrence, so an induction head forms while the learning rate is high: from step 500 the
  loss on repeats falls from log 27 = 3.3 nats a letter (guessing) to under 0.5 by step 700
  and ~0.1 at the end. A previous-token head forms on the way, as the induction head needs one.
- steps 650-1499: seven rows in eight are prose, which makes the text recognisable (validation
  loss ~1.4 nats a character) and keeps the model from looping, as a model that ends on half
  copy rows does; the eighth row keeps the induction head.

Why ship a context of 64 (``--ship-ctx``) after training on 128: a learner's default model
must have sizes that name themselves. With C = ctx = 128 every trace showed ``(128:C|ctx, ...)``;
shipped, the sizes are C=128, ctx=64, hs=32, 3C=384, 4C=512, V=81 (the 4 heads and 4 layers
share a number, but traces never name layers). Keeping the first 64 rows of the position
embedding changes nothing a 64-token input computes (attention is causal, positions absolute):
the script checks that the logits are identical. Training on 64-character rows instead was
tried (64 x 64 and 32 x 64 rows, 8 heads): on the shared 2-core machine of the session that
shipped this, with a load of 9-11, neither reached step 100 in 6 minutes, so the measured
128-character recipe stayed.

Measured on the shipped model (``tests/test_embedded.py``): the previous-token head h.0 head 0
puts 0.93 of its weight on the previous token, the induction head h.1 head 3 0.89 on the token
after the earlier copy (32 random letters seen twice, whose second copy then costs 0.2-0.7
nats a letter against 3.2-3.5 for the first).

Seeded, so a rerun with the same thread count on the same torch gives the same weights; the
shipped ``model.safetensors`` is the output of ``python scripts/train_tiny.py --threads 2``
(torch 2.13.0+cpu, written on 2026-11-28 in 26 minutes at low priority beside other jobs).
The model code is part of the recipe: a change to ``GPT2``'s initialisation or forward changes
the weights this writes, so retrain then.
It goes through our readable :class:`~torchlens_edu.models.GPT2` for training and is saved by
Hugging Face's own ``GPT2LMHeadModel.save_pretrained`` (Conv1D layout), so loading it exercises
exactly the code path of the real GPT-2 weights.

    python scripts/train_tiny.py                    # fetches the .deb with apt-get download
    python scripts/train_tiny.py --deb path/to/r-cran-janeaustenr_1.0.0-1_all.deb
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from torchlens_edu.models import GPT2, GPT2Config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "torchlens_edu" / "data" / "embedded"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


# ---------------------------------------------------------------------------- corpus
def fetch_deb(workdir: Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``workdir``; returns the .deb."""
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
    return next(workdir.glob("r-cran-janeaustenr_*.deb"))


def read_novels(deb: Path) -> list[list[str]]:
    """The six novels, each a list of printed lines, read from the Debian package."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        data = (Path(tmp) / RDB).read_bytes()
    novels, pos = [], 0
    while pos < len(data):  # entries: 4-byte big-endian length, then one zlib stream
        z = zlib.decompressobj()
        raw = z.decompress(data[pos + 4:])
        novels.append(_r_character_vector(raw))
        pos = len(data) - len(z.unused_data)
    return novels


def _r_character_vector(raw: bytes) -> list[str]:
    """Decode an R serialization (format 3, XDR) of a plain character vector."""
    if raw[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    off = 2 + 12  # format version, R version, minimal R version
    (enc_len,) = struct.unpack_from(">i", raw, off)
    off += 4 + enc_len  # native encoding name (format 3)
    flags, n = struct.unpack_from(">ii", raw, off)
    off += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected a character vector, got R type {flags & 0xFF}")
    lines = []
    for _ in range(n):
        _, length = struct.unpack_from(">ii", raw, off)  # CHARSXP flags, byte length
        off += 8
        if length < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(raw[off:off + length].decode("utf-8"))
        off += length
    return lines


def to_text(novel: list[str]) -> str:
    """Reflow printed lines into one paragraph per line: the model learns prose, not line breaks."""
    paragraphs, current = [], []
    for line in novel:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs) + "\n"


def write_words(text: str, out: Path, min_count: int = 2) -> int:
    """``words.txt``: the corpus' words (lower case, seen at least ``min_count`` times), one a line.

    Tests and lessons use it to check that generated text is made of real words.
    """
    counts: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, n in counts.items() if n >= min_count)
    out.mkdir(parents=True, exist_ok=True)
    (out / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return len(words)


# ---------------------------------------------------------------------------- training
def build(text: str, args: argparse.Namespace
          ) -> tuple[GPT2, list[str], torch.Tensor, torch.Tensor]:
    """The seeded, untrained model, its vocabulary, and the corpus as train / val token ids."""
    torch.manual_seed(args.seed)
    vocab = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n_val = len(data) // 20
    config = GPT2Config(vocab_size=len(vocab), n_positions=args.ctx, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, attn_impl="sdpa")
    model = GPT2(config)
    print(f"corpus {len(text):,} chars, vocab {len(vocab)}, model {model.num_params():,} params")
    return model, vocab, data[:-n_val], data[-n_val:]


def fit(model: GPT2, train_data: torch.Tensor, val_data: torch.Tensor,
        args: argparse.Namespace) -> None:
    """AdamW with warm-up and cosine decay: ``args.steps`` batches of ``args.batch`` x ``args.ctx``.

    Some rows of each batch are *copy rows*: a random string of lower-case letters and spaces
    (8 characters to half a row) repeated to fill the row. Prose rarely repeats within a row,
    so a short run on prose alone learns no copying; in a random string nothing but copying
    predicts the second copy, which rewards an induction head directly. For the first
    ``args.copy_until`` steps half of each batch is copy rows, so the head forms while the
    learning rate is high; after that one row in eight keeps it, and prose has the last word
    (a model that ends on half copy rows loops: "evive evive evive").
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    ctx, steps = args.ctx, args.steps
    letters = torch.tensor(args.letter_ids)  # token ids of "a".."z" and " "

    def batch(split: torch.Tensor, n_repeated: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - ctx - 1, (args.batch,), generator=gen)
        rows = [split[i:i + ctx + 1] for i in ix.tolist()]
        for r in range(n_repeated):
            n = int(torch.randint(8, ctx // 2 + 1, (1,), generator=gen))  # seen twice or more
            snippet = letters[torch.randint(len(letters), (n,), generator=gen)]
            rows[r] = snippet.repeat(ctx // n + 2)[:ctx + 1]  # snippet, snippet, ...
        seq = torch.stack(rows)  # (B, T + 1)
        return seq[:, :-1], seq[:, 1:]  # inputs (B, T), next-token targets (B, T)

    t0 = time.time()
    for step in range(steps + 1):
        # linear warm-up, then cosine decay to a tenth of the peak
        warm = min(1.0, (step + 1) / args.warmup)
        lr_now = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        if step % args.eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                xv, yv = batch(val_data)
                val = F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()).item()
                xr, yr = batch(val_data, args.batch)  # all copy rows: loss after the first copy
                half = ctx // 2  # every snippet is at most half the context
                rep = F.cross_entropy(model(xr)[:, half:].flatten(0, 1), yr[:, half:].flatten())
            model.train()
            print(f"step {step:5d}  val loss {val:.3f}  repeated-snippet loss {rep.item():.3f}  "
                  f"lr {lr_now:.2e}  {time.time() - t0:6.0f}s", flush=True)
        if step == steps:
            break
        share = args.repeats if step < args.copy_until else args.repeats_after
        x, y = batch(train_data, round(share * args.batch))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


# ---------------------------------------------------------------------------- saving
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def save_hf(model: GPT2, vocab: list[str], out: Path) -> None:
    """Save through Hugging Face's ``GPT2LMHeadModel.save_pretrained``: exactly the real layout."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(HFConfig(vocab_size=c.vocab_size, n_positions=c.n_positions,
                                  n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                                  n_inner=c.n_inner, layer_norm_epsilon=c.layer_norm_epsilon,
                                  activation_function="gelu_new", resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                  eos_token_id=None))
    state = {}
    for key, value in model.state_dict().items():
        # our nn.Linear stores (out, in); HF's Conv1D stores (in, out)
        state[key] = value.t().contiguous() if key.endswith(_CONV1D) else value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.eval()
    probe = torch.randint(c.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(probe).logits - model(probe)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"HF and our GPT2 disagree by {diff:.2e} after conversion")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # nothing in it we use
    tokenizer = {"type": "chars", "vocab": vocab,
                 "note": "character-level: token id i is the character vocab[i]"}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
    print(f"saved to {out} (HF vs ours max |diff| {diff:.1e})")


def crop_context(model: GPT2, ctx: int) -> GPT2:
    """The same model reading at most ``ctx`` tokens: the first ``ctx`` position embeddings.

    Attention is causal and positions are absolute, so a prompt of ``T <= ctx`` tokens uses
    rows ``0..T-1`` of ``wpe`` and nothing else that depends on the longer context: the logits
    are the very same numbers, which this checks on a full-length probe.
    """
    if not 1 <= ctx <= model.config.n_positions:
        raise ValueError(f"--ship-ctx {ctx}: give 1..{model.config.n_positions}, the context "
                         "the model was trained on")
    cropped = GPT2(dataclasses.replace(model.config, n_positions=ctx)).eval()
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:ctx].clone()  # (ctx, C)
    cropped.load_state_dict(state)
    probe = torch.randint(model.config.vocab_size, (2, ctx),
                          generator=torch.Generator().manual_seed(0))  # (B=2, T=ctx)
    with torch.no_grad():
        if not torch.equal(cropped(probe), model(probe)):
            raise RuntimeError(f"cropping the context to {ctx} changed the logits")
    return cropped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deb", type=Path, help="r-cran-janeaustenr .deb (default: apt-get download)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=128, help="training rows (characters)")
    p.add_argument("--ship-ctx", type=int, default=64,
                   help="the context of the saved model: the first rows of wpe (default 64)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--copy-until", type=int, default=650,
                   help="steps with --repeats copy rows; then --repeats-after")
    p.add_argument("--repeats", type=float, default=0.5, help="share of copy rows at first")
    p.add_argument("--repeats-after", type=float, default=0.125, help="share of copy rows later")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice, all cores); the same seed and "
                        "thread count give the same weights")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # this script's own process only
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_deb(Path(tmp))
        text = "".join(to_text(novel) for novel in read_novels(deb))
    print(f"{write_words(text, args.out):,} distinct words written to {args.out / 'words.txt'}")
    model, vocab, train_data, val_data = build(text, args)
    args.letter_ids = [vocab.index(c) for c in " abcdefghijklmnopqrstuvwxyz"]
    fit(model, train_data, val_data, args)
    save_hf(crop_context(model, args.ship_ctx), vocab, args.out)


if __name__ == "__main__":
    main()
