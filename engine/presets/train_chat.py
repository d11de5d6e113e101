"""Train ``tiny-chat``: a ~5M-parameter Llama on the King James Bible, written in HF format.

    apt-get install bible-kjv          # Debian's KJV text and its reader (public domain text)
    python -m pdserve.engine.presets.train_chat --out engine/presets/tiny-chat --minutes 30

One torch thread by default (``--threads``): the budget is wall time, and the learning rate follows it
(linear warm-up, cosine decay to 10 % at the end of ``--minutes``; ``--steps`` makes it a fixed number of
steps instead). It writes config.json, model.safetensors (float16), generation_config.json, the tokenizer
(byte-level BPE trained here, with the chat template) and a model card (README.md) with the final losses.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from pdserve.engine.presets import chat_corpus

MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdserve.engine.presets.train_chat", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny-chat")
    p.add_argument("--corpus", type=Path, default=None, help="KJV text as printed by `bible gen1:1-rev22:21`")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the training loop")
    p.add_argument("--steps", type=int, default=0, help="a fixed number of steps instead of --minutes")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


class Batches:
    """Random windows of ``seq_len + 1`` tokens from the packed documents, with a mask of the tokens that are
    learned (not a chat turn's question: see ``chat_corpus.split_target``); a fresh cut of the corpus into
    documents (passages, questions) every epoch, so the model sees the text in varied chat turns."""

    def __init__(self, verses, tokenizer, seq_len: int, batch_size: int, seed: int):
        import torch

        self.verses, self.tok, self.seq_len, self.batch_size = verses, tokenizer, seq_len, batch_size
        self.rng = random.Random(seed)
        self.epoch = 0
        self.order: list[int] = []
        self.stream = torch.empty(0, dtype=torch.long)
        self.learn = torch.empty(0, dtype=torch.bool)
        self._next_epoch()

    def _pack(self, docs: list[str]):
        import torch

        parts = [chat_corpus.split_target(d) for d in docs]
        contexts = self.tok.encode_batch([c for c, _ in parts], add_special_tokens=False)
        targets = self.tok.encode_batch([t for _, t in parts], add_special_tokens=False)
        ids: list[int] = []
        learn: list[bool] = []
        for c, t in zip(contexts, targets, strict=True):
            ids += c.ids + t.ids
            learn += [False] * len(c.ids) + [True] * len(t.ids)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(learn, dtype=torch.bool)

    def _next_epoch(self) -> None:
        train, _ = chat_corpus.documents(self.verses, seed=self.epoch)
        self.stream, self.learn = self._pack(train)
        starts = list(range(0, len(self.stream) - self.seq_len - 1, self.seq_len))
        self.rng.shuffle(starts)
        self.order = starts
        self.epoch += 1

    def validation(self):
        _, val = chat_corpus.documents(self.verses, seed=0)
        stream, learn = self._pack(val)
        n = (len(stream) - 1) // self.seq_len
        return [(stream[i * self.seq_len : (i + 1) * self.seq_len + 1], learn[i * self.seq_len : (i + 1) * self.seq_len + 1])
                for i in range(n)]

    def next(self):
        import torch

        if len(self.order) < self.batch_size:
            self._next_epoch()
        starts, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        x = torch.stack([self.stream[s : s + self.seq_len + 1] for s in starts])
        return x, torch.stack([self.learn[s : s + self.seq_len + 1] for s in starts])


def _lr(args: argparse.Namespace, step: int, progress: float) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _loss(model, x, learn):
    """Mean next-token loss over the learned targets (``learn`` marks them, aligned with ``x``)."""
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")
    mask = learn[:, 1:].reshape(-1).float()
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def _evaluate(model, windows) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(windows), 16):
            x = torch.stack([w for w, _ in windows[i : i + 16]])
            learn = torch.stack([m for _, m in windows[i : i + 16]])
            losses.append(_loss(model, x, learn).item())
    model.train()
    return sum(losses) / len(losses)


def _sample(model, tok, text: str, max_new_tokens: int = 40) -> str:
    import torch

    ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
    model.eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    model.train()
    return tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def train(args: argparse.Namespace) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = args.corpus.read_text() if args.corpus else chat_corpus.dump_kjv()
    verses = chat_corpus.parse_kjv(raw)
    print(f"corpus: {len(verses)} verses, {len(raw.split())} words", flush=True)
    out: Path = args.out
    train_docs, _ = chat_corpus.documents(verses, seed=0)
    chat_corpus.train_tokenizer(train_docs, args.vocab_size, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), **MODEL_CONFIG)
    model = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters, vocab {config.vocab_size}", flush=True)

    batches = Batches(verses, tok, args.seq_len, args.batch_size, args.seed)
    val_windows = batches.validation()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    budget_s = args.minutes * 60
    start = time.monotonic()
    step, tokens, smooth = 0, 0, None
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = _lr(args, step, progress)
        x, learn = batches.next()
        loss = _loss(model, x, learn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x[:, 1:].numel()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.log_every == 0:
            print(f"step {step} epoch {batches.epoch} loss {smooth:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{tokens / (time.monotonic() - start):.0f} tok/s {elapsed / 60:.1f} min", flush=True)
        if step % (args.log_every * 25) == 0:
            print("  sample:", repr(_sample(model, tok, chat_corpus.render_chat([("user", "Hello")], True))),
                  flush=True)
    train_s = time.monotonic() - start
    val_loss = _evaluate(model, val_windows)
    stats = dict(steps=step, tokens=tokens, train_minutes=round(train_s / 60, 1), train_loss=round(smooth, 3),
                 val_loss=round(val_loss, 3), val_ppl=round(math.exp(val_loss), 1), num_params=num_params,
                 epochs=round(tokens / max(1, len(batches.stream)), 2), args={k: str(v) for k, v in vars(args).items()})
    print("final:", json.dumps(stats), flush=True)

    model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False).save_pretrained(str(out))
    (out / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_model_card(out)
    return stats


CARD_PROMPTS = [("plain", "Once upon a time"), ("plain", "Hello from pdserve"), ("chat", "Who are you?"),
                ("chat", "What is wisdom?"), ("chat", "Tell me about the sea.")]


def write_model_card(out: Path) -> None:
    """README.md beside the weights: data, licence, size, losses, samples (greedy, from the saved files)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    stats = json.loads((out / "train_stats.json").read_text())
    c = json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    samples = []
    for kind, text in CARD_PROMPTS:
        prompt = text if kind == "plain" else chat_corpus.render_chat([("user", text)], add_generation_prompt=True)
        samples.append(f"- {kind} `{text}` ->\n  {_sample(model, tok, prompt, 48)!r}")
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    a = stats["args"]
    card = f"""# tiny-chat

The default model of pdserve: a {stats['num_params'] / 1e6:.1f}M-parameter Llama ({c['num_hidden_layers']} layers, hidden {c['hidden_size']},
{c['num_attention_heads']} heads, {c['num_key_value_heads']} KV heads, tied embeddings, {size_mb:.1f} MB of float16 weights) with a {a['vocab_size']}-token byte-level BPE
tokenizer, trained from scratch on the King James Bible. It writes readable, archaic English; it knows
nothing else and follows no instructions: any question gets a scripture-like passage. For tests, demos
and serving smoke checks, not for facts.

## Data and licence

- Text: the King James Version of the Bible (1611), 31,102 verses, about 820k words, from Debian's
  `bible-kjv-text` package (read with `bible-kjv`'s `bible` program). The KJV text is in the public domain
  (outside the United Kingdom, where the Crown's letters patent apply); the Debian package says: "The
  copyright for the King James Version text of the Bible is expired". No other data was used.
- Training documents: passages of 2-8 consecutive verses, half as plain running text (no special tokens,
  so a plain prompt is continued), half as a chat turn (a user question: a topic from the passage's first
  verse, a greeting, a book and chapter, or the verse before the passage; the passage as the answer, ending
  in `</s>`; a system message one time in five) rendered with the chat template below. The loss counts the
  plain text and the answers, not the questions. A new cut every pass. Every 50th chapter is held out.
- The weights, the tokenizer and this card are derived from that public-domain text alone and ship with
  pdserve under the same terms as its code.

## Format

Chat template (in `tokenizer_config.json`; HF `apply_chat_template` and the router render it alike):
`<s><|system|>\\n...</s>\\n<|user|>\\n...</s>\\n<|assistant|>\\n` (the last part is the generation prompt).
`<s>` = 1, `</s>` = 2 (end of turn and of text), `<pad>` = 0. Plain prompts get no special tokens.
Trained on {a['seq_len']}-token windows: longer contexts load (up to 1024 positions) but read worse.

## Training

- {stats['steps']} steps of {a['batch_size']} x {a['seq_len']} tokens ({stats['tokens'] / 1e6:.1f}M tokens,
  {stats['epochs']} passes over the packed corpus), AdamW (0.9, 0.95, weight decay 0.1),
  peak LR {a['lr']}, {a['warmup_steps']} warm-up steps, cosine to 10 % over the wall-time budget;
  {stats['train_minutes']} min on one CPU thread.
- Final training loss {stats['train_loss']} (smoothed), validation loss {stats['val_loss']}
  (perplexity {stats['val_ppl']}) per learned token.
- Limits: greedy decoding loops within an answer ("and the land of Egypt, and the land of Egypt"); sampling
  (temperature 0.7) reads better but coins a word now and then; answers barely depend on the question.

## Retrain

```bash
apt-get install bible-kjv
python -m pdserve.engine.presets.train_chat --out engine/presets/tiny-chat --minutes {float(a['minutes']):g}
```

The wall-time budget makes the number of steps follow the machine's load (one free core trains about 2.5k
tokens/s; on a busy shared box this run got about 1k); `--steps N` fixes the schedule instead.

## Samples (greedy, max 48 tokens)

{chr(10).join(samples)}
"""
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    train(_parse(argv))


if __name__ == "__main__":
    main()
