"""Tiny real causal LMs for the search tests: a base and fine-tunes trained (real steps) on two
synthetic text domains, each a Hugging Face folder with its own word-level tokenizer."""
from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = [f"a{i}" for i in range(16)] + [f"b{i}" for i in range(16)]


def domain_text(domain: str, n_words: int, seed: int) -> str:
    """A Markov chain per domain: 'a' text mostly steps a_i -> a_{i+1}, 'b' text b_i -> b_{i+3}."""
    rng = random.Random(f"{domain}-{seed}")
    step, own = (1, "a") if domain == "a" else (3, "b")
    i, out = rng.randrange(16), []
    for _ in range(n_words):
        if rng.random() < 0.8:
            i = (i + step) % 16
            out.append(f"{own}{i}")
        else:
            out.append(rng.choice(WORDS))
    return " ".join(out)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def _train(model, ids: list[int], steps: int, seed: int, lr: float = 3e-3) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.tensor(ids)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        x = torch.stack([data[s:s + 32] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_lms(root: Path, layers: int = 4, steps: int = 25) -> dict[str, Path]:
    """base (trained on both domains a little), ft_a and ft_b (then on one domain), and val/test texts."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok = _tokenizer()
    cfg = GPT2Config(vocab_size=len(WORDS) + 2, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    text = {d: domain_text(d, 3000, 0) for d in "ab"}
    ids = {d: tok(text[d])["input_ids"] for d in "ab"}
    base = GPT2LMHeadModel(cfg)
    _train(base, ids["a"][:1500] + ids["b"][:1500], steps, seed=1)
    out = {}
    for name, model in (("base", base),):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    for d in "ab":
        ft = GPT2LMHeadModel(cfg)
        ft.load_state_dict(base.state_dict())
        _train(ft, ids[d], steps, seed=2)
        ft.save_pretrained(root / f"ft_{d}")
        tok.save_pretrained(root / f"ft_{d}")
        out[f"ft_{d}"] = root / f"ft_{d}"
    for d in "ab":
        (root / f"val_{d}.txt").write_text(domain_text(d, 400, 1))
        out[f"val_{d}"] = root / f"val_{d}.txt"
    return out
