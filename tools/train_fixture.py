"""Train a small PIPO model on 2 CPU cores: the quality fixture (issue 23, item 1).

    python tools/train_fixture.py OUT [--seed 0] [--smoke]

Writes OUT/ as a Hugging Face PIPO checkpoint (config.json, model.safetensors, tokenizer.json)
plus heldout.txt (the held-out text, <= ~200 KB), metrics.json and RECIPE.md (this command, the
seed, the data recipe, every setting, the losses and the held-out figures).

Data: what every Python install ships, the standard library's sources (no test folders) and its
prose (.txt files, pydoc_data/topics.py). Whole files are held out by a hash of their path,
prose among them, so the held-out figures are not flattered by shared boilerplate. A byte-level
BPE tokenizer (`tokenizers`) is trained on the training files only.

Model: the project's own Qwen3.5 PIPO modules (pipo_export.model.modules.PipoModel) at a small
shape with both layer kinds, the mlp compressor, the MTP layer and the confidence head; hidden
and intermediate sizes multiples of 256 (llama.cpp's K-quants apply to the same model).

Recipe (the paper's, in miniature):
1. teacher: the backbone, embedding and lm_head trained as a regular causal LM on tokens;
2. PIPO initialised from it (compressor and MTP fresh), trained on pairs with the shared pair
   forward (PipoModel.pair_forward): cross-entropy of token 1 and token 2 plus KL from the
   frozen teacher's distributions at the same tokens (distillation);
3. the confidence head alone (everything else frozen), binary cross-entropy against the
   rejection-sampling acceptance min(1, p_teacher(x) / q_mtp(x)) of one draft x ~ q_mtp per pair,
   both distributions at `gate_temperature`. The default 0 is greedy decoding (what the
   benchmarks run): the draft is q's argmax and the acceptance is 1 exactly when it is also the
   teacher's argmax. (At temperature 1 the distilled MTP agrees with its teacher so well that
   the mean acceptance is ~0.75 and the gate commits ~100 % of pairs at tau 0.5: a first run,
   recorded in RECIPE.md.)
Departures: a few thousand steps on ~10 MB of code and prose instead of a pretraining corpus;
AdamW with a cosine schedule and one short warm-up per stage; one draft per pair; the teacher
has the student's backbone shape (it is its initialisation).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PAD, EOS = "<|pad|>", "<|endoftext|>"  # ids 0 and 1 (the tokenizer's specials come first)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
TAUS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class Settings:
    seed: int = 0
    vocab: int = 4096
    hidden: int = 256
    intermediate: int = 512
    layer_types: tuple = ("linear_attention", "linear_attention", "linear_attention",
                          "full_attention")
    heads: int = 4  # full attention: 4 x 64, 2 kv heads
    linear_heads: tuple = (4, 8)  # Gated DeltaNet key / value heads of 32
    seq: int = 256  # tokens per training window (128 pairs)
    batch: int = 16
    # teacher, PIPO, confidence head: an estimate for ~30 min on 2 quiet cores (the training
    # log prints tokens/s; RECIPE.md records the seconds of each stage)
    steps: tuple = (450, 550, 150)
    lr: tuple = (2e-3, 1.5e-3, 1e-3)
    warmup: int = 50
    distill: float = 0.5  # weight of the teacher KL against the true-token cross-entropy
    gate_temperature: float = 0.0  # of the gate's acceptance targets; 0: greedy (argmax match)
    train_mb: float = 10.0  # text the tokenizer and the model train on
    heldout_kb: float = 190.0
    heldout_every: int = 20  # 1 in N files (by path hash) is held out
    weight_dtype: str = "bfloat16"  # of model.safetensors (<= ~10 MB)
    threads: int = 2
    log_every: int = 25


SMOKE = dict(vocab=512, intermediate=256, layer_types=("linear_attention", "full_attention"),
             seq=64, batch=4, steps=(15, 15, 8), train_mb=0.4, heldout_kb=6.0,
             heldout_every=10, log_every=5)


# ---------------------------------------------------------------------------- data
def corpus_files() -> list[tuple[str, Path]]:
    """(path relative to the standard library, path) of every source and prose file."""
    root = Path(sysconfig.get_path("stdlib"))
    files = [f for ext in ("*.py", "*.txt") for f in root.rglob(ext)
             if not SKIP_DIRS & set(f.relative_to(root).parts) and f.is_file()]
    return sorted((f.relative_to(root).as_posix(), f) for f in files)


def is_prose(rel: str) -> bool:
    return rel.endswith(".txt") or rel == "pydoc_data/topics.py"


def split_files(s: Settings) -> tuple[list, list]:
    """-> (training texts, held-out [(relpath, text)]): held-out files are those whose path hash
    is 0 mod heldout_every (at least one prose file), up to heldout_kb; training texts are the
    rest, shuffled by the seed, up to train_mb."""
    def h(rel):
        return int(hashlib.sha256(rel.encode()).hexdigest(), 16)
    texts = [(rel, path.read_text(encoding="utf-8", errors="replace"))
             for rel, path in corpus_files()]
    picked = [t for t in texts if h(t[0]) % s.heldout_every == 0]
    if not any(is_prose(rel) for rel, _ in picked):
        prose = sorted((t for t in texts if is_prose(t[0]) and t[0] != "pydoc_data/topics.py"),
                       key=lambda t: h(t[0]))
        picked = prose[:1] + picked
    heldout, size = [], 0
    for rel, text in sorted(picked, key=lambda t: (not is_prose(t[0]), h(t[0]))):
        if size + len(text.encode()) <= s.heldout_kb * 1024:
            heldout.append((rel, text))
            size += len(text.encode())
    held = {rel for rel, _ in picked}  # every picked file stays out of training
    train = [t for t in texts if t[0] not in held]
    random.Random(s.seed).shuffle(train)
    out, size = [], 0
    for rel, text in train:
        if size >= s.train_mb * 2**20:
            break
        out.append((rel, text))
        size += len(text.encode())
    return out, heldout


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    """Texts -> one token stream, EOS between files."""
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


class Windows:
    """Seeded random training windows [batch, seq] from a token stream."""

    def __init__(self, stream: torch.Tensor, s: Settings, stage: int):
        self.stream, self.s = stream, s
        self.gen = torch.Generator().manual_seed(s.seed * 10 + stage)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.stream) - self.s.seq, (self.s.batch,),
                               generator=self.gen)
        return torch.stack([self.stream[i:i + self.s.seq] for i in starts.tolist()])


# ---------------------------------------------------------------------------- model
def text_config(s: Settings, tok) -> dict:
    return {"model_type": "qwen3_5_text", "vocab_size": s.vocab, "hidden_size": s.hidden,
            "intermediate_size": s.intermediate, "num_hidden_layers": len(s.layer_types),
            "layer_types": list(s.layer_types), "num_attention_heads": s.heads,
            "num_key_value_heads": 2, "head_dim": 64, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "attention_bias": False, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "linear_num_key_heads": s.linear_heads[0],
            "linear_num_value_heads": s.linear_heads[1],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.25},
            "compressor_type": "mlp", "mtp_num_hidden_layers": 1,
            "pad_token_id": tok.token_to_id(PAD), "eos_token_id": tok.token_to_id(EOS),
            "architectures": ["Qwen3_5ForCausalPIPO"]}


def build_model(config: dict):
    from pipo_export.model.config import CompressorType, parse_config
    from pipo_export.model.modules import PipoModel
    cfg = parse_config(dict(config))
    cfg.compressor_type = CompressorType.MLP
    return PipoModel(cfg)


def token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The backbone as a regular causal LM (the teacher): ids [B, T] -> logits [B, T, V]."""
    hidden = model.model(inputs_embeds=model.model.embed_tokens(ids), use_cache=False)
    return model.lm_head(hidden.last_hidden_state)


def kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last dim, mean over positions."""
    v = student.shape[-1]
    return F.kl_div(F.log_softmax(student.reshape(-1, v), -1),
                    F.log_softmax(teacher.reshape(-1, v), -1), log_target=True,
                    reduction="batchmean")


def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def teacher_pair_logits(teacher, ids):
    """The teacher's distributions at the tokens the pairs predict: token 1 of pair i+1
    (t_2i+2, read at token 2i+1) and token 2 (t_2i+3, at token 2i+2), [B, L-1, V] each."""
    with torch.no_grad():
        logits = token_logits(teacher, ids)
    return logits[:, 1:-2:2], logits[:, 2:-1:2]


def stage_loss(stage: int, model, teacher, ids, s: Settings) -> torch.Tensor:
    if stage == 0:
        return ce(token_logits(model, ids)[:, :-1], ids[:, 1:])
    backbone, mtp, conf = model.pair_forward(ids)
    p1, p2 = teacher_pair_logits(teacher, ids)
    if stage == 1:
        t1, t2 = ids[:, 2::2], ids[:, 3::2]
        a = s.distill
        return ((1 - a) * (ce(backbone[:, :-1], t1) + ce(mtp, t2))
                + a * (kd(backbone[:, :-1], p1) + kd(mtp, p2)))
    with torch.no_grad():  # rejection-sampling acceptance of one draft per pair
        if s.gate_temperature == 0:  # greedy: q and p one-hot at their argmax
            target = (mtp.argmax(-1) == p2.argmax(-1)).float().reshape(-1)
        else:
            t = s.gate_temperature
            q = torch.softmax(mtp.float() / t, -1).reshape(-1, mtp.shape[-1])
            p = torch.softmax(p2.float() / t, -1).reshape(-1, mtp.shape[-1])
            x = torch.multinomial(q, 1)
            target = torch.clamp(p.gather(1, x) / q.gather(1, x), max=1.0)[:, 0]
    return F.binary_cross_entropy(conf.reshape(-1).clamp(1e-6, 1 - 1e-6), target)


def train_stage(stage: int, model, teacher, stream, s: Settings, log) -> list[float]:
    names = ("teacher LM", "PIPO (distilled)", "confidence head")
    params = [p for n, p in model.named_parameters()
              if (n.startswith("confidence_head.") if stage == 2 else
                  not n.startswith(("compressor.", "mtp.", "confidence_head.")) if stage == 0
                  else not n.startswith("confidence_head."))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    steps, lr = s.steps[stage], s.lr[stage]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * i / steps)))
    batches, losses, start = Windows(stream, s, stage), [], time.perf_counter()
    model.train()
    for i in range(steps):
        loss = stage_loss(stage, model, teacher, batches(), s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (i + 1) % s.log_every == 0 or i + 1 == steps:
            rate = (i + 1) * s.batch * s.seq / (time.perf_counter() - start)
            log(f"  {names[stage]} step {i + 1}/{steps}: loss "
                f"{sum(losses[-s.log_every:]) / len(losses[-s.log_every:]):.4f}, "
                f"{rate:,.0f} tokens/s")
    model.eval()
    return losses


# ---------------------------------------------------------------------------- figures
def heldout_figures(model, teacher, ids: torch.Tensor, unigram: torch.Tensor,
                    s: Settings) -> dict:
    """Held-out perplexity of token 1 and token 2 through the shared pair forward, the
    teacher's and a unigram model's perplexity, and the gate's commit rate at each tau."""
    nll1, nll2, conf, tnll = [], [], [], []
    n = len(ids) // s.seq * s.seq
    windows = ids[:n].reshape(-1, s.seq)
    for w in windows.split(s.batch):
        backbone, mtp, c = model.teacher_forced(w)
        nll1.append(F.cross_entropy(backbone[:, :-1].reshape(-1, s.vocab),
                                    w[:, 2::2].reshape(-1), reduction="none"))
        nll2.append(F.cross_entropy(mtp.reshape(-1, s.vocab), w[:, 3::2].reshape(-1),
                                    reduction="none"))
        conf.append(c.reshape(-1))
        with torch.no_grad():
            t = token_logits(teacher, w)[:, :-1]
        tnll.append(F.cross_entropy(t.reshape(-1, s.vocab), w[:, 1:].reshape(-1),
                                    reduction="none"))
    conf = torch.cat(conf)
    return {"heldout_tokens": int(len(ids)), "scored_windows": int(len(windows)),
            "perplexity_token1": math.exp(torch.cat(nll1).mean()),
            "perplexity_token2": math.exp(torch.cat(nll2).mean()),
            "teacher_perplexity": math.exp(torch.cat(tnll).mean()),
            "unigram_perplexity": math.exp(-unigram[ids].mean()),
            "mean_confidence": float(conf.mean()),
            "commit_rate": {str(t): float((conf >= t).float().mean()) for t in TAUS}}


def unigram_logp(stream: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.bincount(stream, minlength=vocab).double() + 1.0  # add-one smoothing
    return (counts / counts.sum()).log()


# ---------------------------------------------------------------------------- output
def save(out: Path, model, config: dict, tok, s: Settings) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().to(getattr(torch, s.weight_dtype)).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))


def recipe(argv, s: Settings, data: dict, losses: list, figures: dict, seconds: dict) -> str:
    f = figures
    lines = ["# The PIPO quality fixture", "",
             "Written by `tools/train_fixture.py` (its docstring states the recipe and where it "
             "departs from the paper's).", "", "## Command", "",
             f"    python tools/train_fixture.py {' '.join(argv)}", "",
             f"Seed {s.seed}; Python {sys.version.split()[0]}, torch {torch.__version__}, "
             f"{s.threads} threads.", "", "## Data", "",
             f"- training: {data['train_files']} files of the standard library "
             f"({data['train_bytes']:,} bytes, {data['train_tokens']:,} tokens), "
             "shuffled by the seed;",
             f"- held out (heldout.txt, {data['heldout_bytes']:,} bytes): "
             + ", ".join(data["heldout_files"]) + ";",
             f"- tokenizer: byte-level BPE of {s.vocab} tokens trained on the training files; "
             f"{PAD} = 0, {EOS} = 1 (between files).", "", "## Settings", "", "```json",
             json.dumps(dataclasses.asdict(s), indent=1), "```", "", "## Training", ""]
    for name, stage_losses, sec in zip(("teacher LM", "PIPO (distilled)", "confidence head"),
                                       losses, seconds.values()):
        last = stage_losses[-20:]
        lines.append(f"- {name}: {len(stage_losses)} steps in {sec:.0f} s, loss "
                     f"{stage_losses[0]:.3f} -> {sum(last) / len(last):.3f} (mean of the last "
                     f"{len(last)})")
    lines += ["", "## Held-out figures (teacher forced, the shared pair forward)", "",
              f"- perplexity token 1 {f['perplexity_token1']:.2f}, token 2 (MTP) "
              f"{f['perplexity_token2']:.2f}; teacher LM {f['teacher_perplexity']:.2f}; unigram "
              f"{f['unigram_perplexity']:.2f}",
              f"- gate: mean confidence {f['mean_confidence']:.3f}; commit rate "
              + ", ".join(f"{r:.1%} at tau {t}" for t, r in f["commit_rate"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=Settings.seed)
    ap.add_argument("--smoke", action="store_true",
                    help="a few dozen steps at tiny sizes (checks the script end to end)")
    ap.add_argument("--steps", default=None, metavar="A,B,C",
                    help="steps of the teacher, PIPO and confidence-head stages (default "
                         f"{','.join(map(str, Settings.steps))})")
    ap.add_argument("--threads", type=int, default=Settings.threads)
    ap.add_argument("--gate-temperature", type=float, default=Settings.gate_temperature,
                    help="temperature of the gate's acceptance targets (0: greedy, default)")
    ap.add_argument("--force", action="store_true", help="write into an existing folder")
    args = ap.parse_args(argv)
    s = Settings(seed=args.seed, threads=args.threads, gate_temperature=args.gate_temperature,
                 **(SMOKE if args.smoke else {}))
    if args.steps:
        s.steps = tuple(int(x) for x in args.steps.split(","))
        if len(s.steps) != 3 or min(s.steps) < 1:
            ap.error(f"--steps takes three positive step counts, got {args.steps}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        ap.error(f"{out} exists and is not empty (--force writes into it)")
    out.mkdir(parents=True, exist_ok=True)

    def log(text):
        print(text, file=sys.stderr, flush=True)
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    torch.set_flush_denormal(True)  # the delta rule's decays underflow: denormals run ~2x slower
    train, heldout = split_files(s)
    log(f"data: {len(train)} training files, {len(heldout)} held out")
    tok = train_tokenizer([t for _, t in train], s.vocab)
    stream = encode(tok, [t for _, t in train])
    heldout_text = "\n\n".join(t for _, t in heldout)
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    held_ids = encode(tok, [heldout_text])
    config = text_config(s, tok)
    model = build_model(config)
    teacher, losses, seconds = None, [], {}
    for stage in range(3):
        t = time.perf_counter()
        losses.append(train_stage(stage, model, teacher, stream, s, log))
        seconds[stage] = time.perf_counter() - t
        if stage == 0:
            teacher = copy.deepcopy(model).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
    save(out, model, config, tok, s)
    from pipo_export import load_checkpoint  # the figures from the checkpoint as written
    saved = load_checkpoint(out)
    figures = heldout_figures(saved, teacher, held_ids, unigram_logp(stream, s.vocab), s)
    data = {"train_files": len(train), "train_bytes": sum(len(t.encode()) for _, t in train),
            "train_tokens": len(stream), "heldout_files": [r for r, _ in heldout],
            "heldout_bytes": len(heldout_text.encode())}
    (out / "metrics.json").write_text(json.dumps({"settings": dataclasses.asdict(s), "data": data,
                                                  "figures": figures}, indent=2) + "\n")
    (out / "RECIPE.md").write_text(recipe(argv, s, data, losses, figures, seconds))
    log(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
